import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import sparsejax
from sparsejax.core import topk_search
from sparsejax.core.topk import kth_largest, num_kept, topk_mask, topk_mask_tracked


def reference_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Stable sort by descending score: ties keep the earlier index."""
    flat = scores.ravel()
    order = np.lexsort((np.arange(flat.size), -flat.astype(np.float64)))
    mask = np.zeros(flat.size, bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


@pytest.mark.parametrize("density", [0.0, 0.013, 0.1, 0.5, 0.9, 1.0])
def test_exact_count_and_same_set_as_sort(density):
    scores = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (37, 53)))
    mask = jax.jit(lambda s: topk_mask(s, density))(scores)
    k = num_kept(density, scores.size)
    assert mask.dtype == jnp.bool_
    assert int(mask.sum()) == k
    np.testing.assert_array_equal(np.asarray(mask), reference_topk(scores, k))


def test_ties_keep_exact_count_and_first_entries():
    # 10 entries, 6 of them tied at the threshold value 2.0; keep 5: 3.0, 3.0 and the
    # first three 2.0s in row-major order.
    scores = jnp.array([[2.0, 3.0, 2.0, 1.0, 2.0], [2.0, 3.0, 2.0, 2.0, 0.0]])
    mask = jax.jit(lambda s: topk_mask(s, 0.5))(scores)
    expected = np.array([[1, 1, 1, 0, 1], [0, 1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(mask), expected)


def test_all_equal_scores_and_signed_zeros():
    assert int(topk_mask(jnp.zeros(1001), 0.3).sum()) == num_kept(0.3, 1001)
    mask = topk_mask(jnp.array([-0.0, 0.0, -0.0, -1.0]), 0.5)
    np.testing.assert_array_equal(np.asarray(mask), [True, True, False, False])


def test_negative_and_extreme_values_rank_correctly():
    scores = jnp.array([-3.0, -1e-30, 1e30, -1e30, 5e-39, 0.0, -5e-39])
    for k in range(scores.size + 1):
        mask = topk_mask(scores, k / scores.size)
        np.testing.assert_array_equal(np.asarray(mask), reference_topk(np.asarray(scores), k))


def test_kth_largest_matches_sort():
    x = jax.random.normal(jax.random.PRNGKey(2), (1000,))
    expected = np.sort(np.asarray(x))[::-1]
    for k in (1, 17, 500, 1000):
        assert float(kth_largest(x, k)) == expected[k - 1]


def test_global_scope_counts_across_leaves_with_leaf_order_ties():
    scores = {"a": jnp.ones((4,)), "b": jnp.ones((4,)) * 2.0, "c": jnp.ones((2,))}
    masks = topk_mask(scores, 0.6, scope="global")  # keep 6 of 10
    assert int(masks["b"].sum()) == 4  # the largest
    np.testing.assert_array_equal(np.asarray(masks["a"]), [True, True, False, False])
    assert int(masks["c"].sum()) == 0  # ties go to the earlier leaf


def test_layer_scope_with_density_tree():
    scores = {"a": jnp.arange(10.0), "b": jnp.arange(4.0)}
    masks = jax.jit(lambda s: topk_mask(s, {"a": 0.3, "b": 0.5}))(scores)
    chex.assert_trees_all_equal(masks, {"a": np.arange(10) >= 7, "b": np.arange(4) >= 2},
                                strict=True)


def test_a_density_or_count_per_leaf_must_be_one_number():
    scores = {"a": jnp.arange(10.0), "b": jnp.arange(4.0)}
    with pytest.raises(ValueError, match="input 1 has rank 1.*give one density per leaf"):
        topk_mask(scores, {"a": 0.3, "b": jnp.array([0.5, 0.5])})
    with pytest.raises(ValueError, match="input 0 has rank 1.*give one count per leaf"):
        topk_mask(jnp.arange(4.0), count=jnp.array([1, 2]))


def test_complex_scores_are_rejected():
    with pytest.raises(TypeError, match="scores must be real numbers, got dtype complex64"):
        topk_mask(jnp.ones(4, jnp.complex64), 0.5)


def test_traced_density_under_jit():
    scores = jnp.arange(100.0)
    mask = jax.jit(lambda s, d: topk_mask(s, d))(scores, jnp.float32(0.25))
    assert int(mask.sum()) == 25


def test_vmap_over_score_batches():
    scores = jax.random.normal(jax.random.PRNGKey(3), (5, 40))
    masks = jax.vmap(lambda s: topk_mask(s, 0.25))(scores)
    assert masks.sum(axis=1).tolist() == [10] * 5


@pytest.mark.parametrize("density", [-0.1, 1.01, float("nan")])
def test_bad_density_is_rejected(density):
    with pytest.raises(ValueError, match="density"):
        topk_mask(jnp.ones(4), density)


def test_non_finite_scores_are_rejected_eagerly_and_under_checkify():
    promised = "ValueError: scores contain non-finite values (NaN or inf) in leaf 'w'"
    bad = {"w": jnp.array([1.0, jnp.nan, 2.0])}
    with pytest.raises(ValueError) as eager:
        topk_mask(bad, 0.5)
    assert f"{type(eager.value).__name__}: {eager.value}" == promised
    with pytest.raises(ValueError, match="non-finite"):
        topk_mask({"w": jnp.array([jnp.inf, 1.0])}, 0.5)
    # Under jit the check is a checkify check the caller opts into, with the same words.
    error, _ = checkify.checkify(jax.jit(lambda s: topk_mask(s, 0.5)))(bad)
    assert error.get().startswith("scores contain non-finite values (NaN or inf) in leaf 'w'")
    error, _ = checkify.checkify(jax.jit(lambda s: topk_mask(s, 0.5)))({"w": jnp.ones(3)})
    assert error.get() is None


def test_a_jitted_top_k_holds_no_host_callback():
    # A host callback would put every mask-deciding program out of reach of JAX's
    # persistent compilation cache (test_compile_cache.py checks the cache itself).
    for scores in ({"w": jnp.ones((3, 4))}, {"w": jnp.ones((300, 100)), "v": jnp.ones(9)}):
        text = jax.jit(lambda s: topk_mask(s, 0.5)).lower(scores).as_text()
        assert "callback" not in text


def test_unknown_scope_and_mismatched_density_tree():
    with pytest.raises(ValueError, match="scope"):
        topk_mask(jnp.ones(4), 0.5, scope="everywhere")
    with pytest.raises(ValueError, match="densities do not match scores"):
        topk_mask({"a": jnp.ones(4)}, {"b": 0.5})


def test_public_name():
    assert sparsejax.topk_mask is topk_mask


# Compiled once per shape and dtype for the tests below (densities are traced).
_select = jax.jit(lambda s, d: topk_mask(s, d))
_select_unchecked = jax.jit(lambda s, d: topk_mask(s, d, check_finite_scores=False))
_select_global = jax.jit(lambda s, d: topk_mask(s, d, scope="global"))


def _sampled(scores, density, scope="layer", check_finite_scores=True):
    """The sampled search, which ``topk_mask_tracked`` runs on groups above
    ``SAMPLE_SIZE`` entries: cuts of zero are no usable hint, so its first cuts come from
    the strided sample (``topk_mask`` itself searches bitwise)."""
    groups = 1 if scope == "global" else len(jax.tree_util.tree_leaves(scores))
    return topk_mask_tracked(scores, density, jnp.zeros((groups, 2)), scope=scope,
                             check_finite_scores=check_finite_scores,
                             sampled_above=topk_search.SAMPLE_SIZE)[0]


_sampled_unchecked = jax.jit(lambda s, d: _sampled(s, d, check_finite_scores=False))
_sampled_tree = jax.jit(lambda s, d: _sampled(s, d))
_sampled_global = jax.jit(lambda s, d: _sampled(s, d, scope="global"))


# Groups above sparsejax.core.topk_search.SAMPLE_SIZE entries take the sampled search in a
# tracked top-k; these data attack its interpolation (mass ties, spikes over 60 decades,
# infinities, sorted runs). The bitwise search of topk_mask gets them too.
def _large_cases(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    spikes = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-30, 30, n)
    mostly_zero = np.where(rng.random(n) < 0.97, 0.0, rng.normal(size=n))
    signed_zeros_and_inf = rng.choice([-0.0, 0.0, 1.0, -np.inf, np.inf, 2.0], n)
    return {
        "normal": rng.normal(size=n),
        "abs_uniform": np.abs(rng.uniform(-1, 1, n)),
        "ten_values": rng.integers(0, 10, n).astype(float),
        "all_equal": np.full(n, 0.25),
        "mostly_zero": mostly_zero,
        "ascending": np.sort(rng.normal(size=n)),
        "descending": -np.sort(rng.normal(size=n)),
        "spikes": spikes,
        "signed_zeros_and_inf": signed_zeros_and_inf,
        "masked_to_minus_inf": np.where(rng.random(n) < 0.9, -np.inf, rng.normal(size=n)),
        "masked_to_plus_inf": np.where(rng.random(n) < 0.9, np.inf, rng.normal(size=n)),
        "near_ties_and_outlier": np.concatenate([1.0 + 1e-7 * rng.integers(0, 3, n - 1),
                                                 [1e38]]),
        # a crowd of close values around the middle, and neighbours (same row of the
        # extraction pass) that tie
        "crowd": np.where(rng.random(n) < 0.3, 0.5 + 1e-6 * rng.normal(size=n),
                          rng.uniform(0, 1, n)),
        "neighbour_ties": np.repeat(rng.normal(size=(n + 1) // 2), 2)[:n],
    }


@pytest.mark.parametrize("n", [5003, 6000])  # 5003 is prime: no rows to extract from
@pytest.mark.parametrize("case", list(_large_cases(8)))
def test_sampled_search_is_exact_on_hard_data(case, n):
    scores = _large_cases(n)[case].astype(np.float32)
    for select in (_sampled_unchecked, _select_unchecked):
        for k in (0, 1, 2, 5, 400, 500, 600, n // 2, n // 2 + 1, 4502, n - 1, n):
            mask = np.asarray(select(scores, k / n))
            assert num_kept(k / n, n) == k
            np.testing.assert_array_equal(mask, reference_topk(scores, k), err_msg=f"k={k}")


def test_sampled_search_matches_sort_on_large_leaves_and_low_precision():
    rng = np.random.default_rng(3)
    scores = {"a": rng.normal(size=(300, 400)).astype(np.float32),
              "b": rng.normal(size=(70_001,)).astype(jnp.bfloat16)}
    for density in (0.001, 0.05, 0.5, 0.97):
        for masks in (_sampled_tree(scores, density), _select(scores, density)):
            for name, leaf in scores.items():
                k = num_kept(density, leaf.size)
                np.testing.assert_array_equal(
                    np.asarray(masks[name]), reference_topk(np.asarray(leaf, np.float32), k))


def test_sampled_global_search_breaks_ties_across_leaves_in_leaf_order():
    # 3 leaves of 3000 entries, every entry 0 or 1: the cut always lands in a tie.
    rng = np.random.default_rng(4)
    leaves = [rng.integers(0, 2, 3000).astype(np.float32) for _ in range(3)]
    flat = np.concatenate(leaves)
    for k in (1, 1500, 4500, 8999):
        for masks in (_sampled_global(leaves, k / flat.size),
                      _select_global(leaves, k / flat.size)):
            np.testing.assert_array_equal(np.concatenate([np.asarray(m) for m in masks]),
                                          reference_topk(flat, k), err_msg=f"k={k}")


def test_sampled_search_under_vmap():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (4, 6000)))
    masks = jax.jit(jax.vmap(lambda s: _sampled(s, 0.3)))(x)
    for row, mask in zip(x, np.asarray(masks), strict=True):
        np.testing.assert_array_equal(mask, reference_topk(row, num_kept(0.3, 6000)))


def test_count_keeps_exactly_that_many_per_leaf_globally_and_traced():
    rng = np.random.default_rng(6)
    scores = {"a": rng.normal(size=(60, 70)).astype(np.float32),
              "b": rng.normal(size=(500,)).astype(np.float32)}
    masks = topk_mask(scores, count={"a": 1234, "b": 7})
    chex.assert_trees_all_equal(masks, {"a": reference_topk(scores["a"], 1234),
                                        "b": reference_topk(scores["b"], 7)}, strict=True)
    flat = np.concatenate([scores["a"].ravel(), scores["b"]])
    joint = jax.jit(lambda s, c: topk_mask(s, count=c, scope="global"))(scores, jnp.int32(999))
    got = np.concatenate([np.asarray(joint["a"]).ravel(), np.asarray(joint["b"])])
    np.testing.assert_array_equal(got, reference_topk(flat, 999))


def test_bad_counts_are_rejected():
    x = jnp.arange(10.0)
    for bad in (-1, 11, 2.5):
        with pytest.raises(ValueError, match="count must be an integer in \\[0, 10\\]"):
            topk_mask(x, count=bad)
    with pytest.raises(ValueError, match="exactly one of density and count"):
        topk_mask(x, 0.5, count=3)
    with pytest.raises(ValueError, match="exactly one of density and count"):
        topk_mask(x)
    with pytest.raises(TypeError, match="count must be an integer"):
        jax.jit(lambda c: topk_mask(x, count=c))(jnp.float32(3.0))


def test_tracked_search_gives_the_same_masks_whatever_the_cuts():
    from sparsejax.core.topk import topk_mask_tracked

    rng = np.random.default_rng(7)
    scores = {"a": rng.normal(size=(120, 50)).astype(np.float32),
              "b": rng.uniform(size=(3000,)).astype(np.float32)}
    select = jax.jit(lambda s, d, c: topk_mask_tracked(
        s, d, c, sampled_above=topk_search.SAMPLE_SIZE))  # "b" takes the sampled search
    masks, cuts = topk_mask_tracked(scores, 0.3)
    assert cuts.shape == (2, 2)
    bad_cuts = [cuts, cuts + 5.0, jnp.full((2, 2), jnp.nan), jnp.array([[0.0, 0.0], [1e30, 1e30]]),
                jnp.array([[-1.0, -3.0], [0.5, 1e-30]])]
    for density in (0.3, 0.31, 0.9):
        for hint in bad_cuts:
            got, new_cuts = select(scores, density, hint)
            chex.assert_trees_all_equal(got, {
                name: reference_topk(v, num_kept(density, v.size)) for name, v in scores.items()})
            assert bool(jnp.all(jnp.isfinite(new_cuts)))
    # The cuts of a call keep exactly k: the next call from them on slightly moved scores
    moved = {k: v + 1e-5 * rng.normal(size=v.shape).astype(np.float32) for k, v in scores.items()}
    got, _ = select(moved, 0.3, cuts)
    chex.assert_trees_all_equal(got, {name: reference_topk(v, num_kept(0.3, v.size))
                                      for name, v in moved.items()})
    with pytest.raises(ValueError, match="cuts must have shape \\(2, 2\\)"):
        topk_mask_tracked(scores, 0.3, jnp.zeros((1, 2)))


def test_counts_stay_exact_beyond_the_integers_float32_holds():
    # 2**24 + 3 is odd, so no float32 holds it: one float32 sum of the flags cannot
    # return it; counted in slices of 2**24 they are exact.
    flags = jnp.ones(2**24 + 4, bool).at[5].set(False)
    assert int(jax.jit(topk_search.count)(flags)) == 2**24 + 3


_select_magnitude = jax.jit(
    lambda s, d, c: topk_mask_tracked(s, d, c, check_finite_scores=False, by_magnitude=True,
                                      sampled_above=topk_search.SAMPLE_SIZE))


@pytest.mark.parametrize("n", [1000, 5003, 6000])  # bitwise; sampled without / with rows
@pytest.mark.parametrize("case", ["normal", "spikes", "signed_zeros_and_inf",
                                  "masked_to_minus_inf", "crowd", "neighbour_ties"])
def test_by_magnitude_ranks_absolute_values_in_every_pass(case, n):
    # Signed data: a pass that ranked the raw values instead of |values| would pick
    # other entries. Cuts of every kind (none, garbage, the last call's) change nothing.
    scores = (_large_cases(n)[case] * np.where(np.arange(n) % 2, -1.0, 1.0)).astype(np.float32)
    magnitudes = np.abs(scores)
    cuts = None
    for k in (1, 5, 400, n // 2, n // 2 + 1, n - 1):
        want = reference_topk(magnitudes, k)
        for hint in (cuts, jnp.array([[-3.0, 1e-30]]), jnp.array([[0.5, 1e30]])):
            got, new_cuts = _select_magnitude(scores, k / n, hint)
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"k={k}")
        cuts = new_cuts
    got = topk_mask(scores, 0.25, check_finite_scores=False, by_magnitude=True)
    np.testing.assert_array_equal(np.asarray(got), reference_topk(magnitudes, num_kept(0.25, n)))


def test_by_magnitude_global_scope_across_leaves():
    rng = np.random.default_rng(11)
    scores = {"a": rng.normal(size=(70, 40)).astype(np.float32),
              "b": -np.abs(rng.normal(size=(500,))).astype(np.float32)}
    got = topk_mask(scores, 0.4, scope="global", by_magnitude=True)
    flat = np.concatenate([np.abs(scores["a"]).ravel(), np.abs(scores["b"])])
    want = reference_topk(flat, num_kept(0.4, flat.size))
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(got["a"]).ravel(), np.asarray(got["b"])]), want)


@pytest.mark.parametrize("n", [24, 5000])  # the bitwise and the sampled search
@pytest.mark.parametrize("odd_one", [None, -4.5e-41, 4.5e-41, -0.0])
def test_zeros_and_subnormals_rank_as_zero_ties_by_position(n, odd_one):
    # A search over zeros once took nextafter(0, inf), a subnormal, as the next cut above
    # 0; XLA's CPU compares it as 0, so every zero counted as above it and the sampled
    # search kept nothing. Subnormals (either sign) and -0.0 tie with 0.0.
    scores = np.zeros(n, np.float32)
    if odd_one is not None:
        scores[n // 3] = odd_one
    for k in (1, n // 3, n // 3 + 1, n - 1):
        got = np.asarray(jax.jit(lambda s, k=k: topk_mask(s, count=k))(scores))
        want = np.zeros(n, bool)
        want[:k] = True
        np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


def test_tracked_search_routes_groups_by_size(monkeypatch):
    """Groups of more than ``sampled_above`` entries take the sampled search (its cut moves
    from the hint), the rest the bitwise one (moved 0); ``None`` reads
    ``topk_search.SAMPLED_ABOVE`` at the call; the masks are the same either way."""
    rng = np.random.default_rng(3)
    scores = {"small": rng.normal(size=3000).astype(np.float32),
              "large": rng.normal(size=5000).astype(np.float32)}
    hints = jnp.zeros((2, 2))
    expected = {name: reference_topk(v, num_kept(0.3, v.size)) for name, v in scores.items()}
    masks, cuts = topk_mask_tracked(scores, 0.3, hints)  # default 2**17: both bitwise
    chex.assert_trees_all_equal(masks, expected)
    assert np.asarray(cuts[:, 1]).tolist() == [0.0, 0.0]
    monkeypatch.setattr(topk_search, "SAMPLED_ABOVE", 4096)
    masks, cuts = topk_mask_tracked(scores, 0.3, hints)
    chex.assert_trees_all_equal(masks, expected)
    assert float(cuts[0, 1]) > 0 and float(cuts[1, 1]) == 0  # leaves in key order: large, small
    for bad in (2047, 1.5e5, True, "big"):
        with pytest.raises(ValueError, match="sampled_above must be an int >= 2048"):
            topk_mask_tracked(scores, 0.3, hints, sampled_above=bad)


def test_ties_ranked_by_position_across_chunks_rows_and_sizes():
    """The tie ranking (a bitwise search over positions) on rows of several sizes at once,
    each spanning several 512-entry chunks with ties on both sides of chunk boundaries:
    every row keeps exactly its count, ties to its first entries, whether its ties are
    too many (ranked) or all kept, and whatever the other rows need; no cumulative sum."""
    rng = np.random.default_rng(5)
    xs = [rng.integers(0, 3, (3, 1500)).astype(np.float32),  # 3 chunks, mass ties
          np.zeros((2, 700), np.float32),                     # all tied: position alone
          rng.normal(size=(2, 5)).astype(np.float32)]         # no ties
    ks = [np.array([0, 1001, 1500]), np.array([699, 513]), np.array([2, 5])]
    search = jax.jit(lambda xs, ks: topk_search.bitwise_topk(xs, ks)[0])
    for shift in (0, 1, 17):  # the cut lands on different tied positions
        counts = [np.clip(k - shift, 0, x.shape[1]).astype(np.int32)
                  for x, k in zip(xs, ks, strict=True)]
        masks = search([jnp.asarray(x) for x in xs], [jnp.asarray(k) for k in counts])
        for x, k, mask in zip(xs, counts, masks, strict=True):
            for row in range(x.shape[0]):
                np.testing.assert_array_equal(np.asarray(mask[row]),
                                              reference_topk(x[row], int(k[row])))
    hlo = search.lower([jnp.asarray(x) for x in xs], [jnp.asarray(k) for k in ks]).as_text()
    assert "cumsum" not in hlo and "reduce_window" not in hlo


def test_tie_ranking_keeps_no_position_array_of_the_size_of_its_input():
    """Where ties are ranked (the chunks of several segments), an entry's position rank is
    compared through its column index, so XLA has no entry-sized invariant to hoist out
    of the ranking loop into an array of its own: the program's temporaries stay under
    1.5x its keys (1.26x measured; 2.26x when each entry's rank was one expression, a
    uint32 array of the keys' size, 12% of a RigL step's temporaries on 8 layers)."""
    x = topk_search.order_key(jax.random.normal(jax.random.PRNGKey(0), (64, 512)))
    segment = np.repeat(np.arange(8), 8)
    ranked = jax.jit(lambda x, cut, k: topk_search.masks_at_threshold(x, cut, k, segment))
    compiled = ranked.lower(x, jnp.zeros(8, jnp.uint32), jnp.ones(8, jnp.int32)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * x.nbytes
    # and it ranks: 8 segments of 8 chunks, every key tied at the cut, keep 1000 of 4096
    masks = ranked(jnp.zeros_like(x), jnp.zeros(8, jnp.uint32), jnp.full(8, 1000, jnp.int32))
    per_segment = np.asarray(masks).reshape(8, -1)
    assert (per_segment.sum(axis=1) == 1000).all() and per_segment[:, :1000].all()


def _slices(compiled_text: str) -> int:
    return compiled_text.count(" slice(")


def test_eager_init_programs_hold_no_slice_per_leaf():
    """The compiled programs of an eager top-k and of the eager random scores return one
    stack per leaf size (of many leaves), and the leaves are taken from it outside at a
    runtime index
    (``split_rows``): XLA's CPU backend compiles every slice at its own offset as a kernel
    of its own (about 12 ms), so a slice per leaf made the eager init of 32 equal layers
    compile in 3.3 s, against 1.3 s now. The masks and scores are those of the traced
    path (plain slices), bit for bit."""
    from sparsejax.core import topk as topk_module
    from sparsejax.methods import draws
    from sparsejax.methods.fixed import random_scores

    def programs(layers: int) -> tuple[int, int]:
        leaves = [jnp.ones((32, 32))] * layers + [jnp.ones(32)] * layers
        ks = [jnp.int32(100)] * layers + [jnp.int32(3)] * layers
        search = topk_module._topk_groups.lower(leaves, ks, None, False, False,
                                                topk_search.SAMPLE_SIZE).compile().as_text()
        shapes = tuple(leaf.shape for leaf in leaves)
        drawn = draws._draw_split.lower(draws.UniformDraw(), jax.random.PRNGKey(0),
                                        shapes).compile().as_text()
        return _slices(search), _slices(drawn)

    from sparsejax.core._tree import SPLIT_OUTSIDE  # fewer leaves of a size: sliced inside

    assert programs(SPLIT_OUTSIDE) == programs(3 * SPLIT_OUTSIDE)
    params = {f"d{i}": {"kernel": jax.random.normal(jax.random.PRNGKey(i), (40, 30)),
                        "bias": jnp.zeros(30)} for i in range(6)}
    scores = random_scores(params, jax.random.PRNGKey(7))
    chex.assert_trees_all_equal(scores, jax.jit(random_scores)(params, jax.random.PRNGKey(7)))
    for scope in ("layer", "global"):
        masks = topk_mask(scores, 0.3, scope=scope)
        chex.assert_trees_all_equal(masks, jax.jit(
            lambda s, scope=scope: topk_mask(s, 0.3, scope=scope))(scores))
        flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(scores)])
        got = np.concatenate([np.ravel(m) for m in jax.tree_util.tree_leaves(masks)])
        if scope == "global":
            np.testing.assert_array_equal(got, reference_topk(flat, num_kept(0.3, flat.size)))
