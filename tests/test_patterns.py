"""Sparsity patterns: exact counts per group, block and channel, ties, jit, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsejax.core.patterns import (
    NM,
    Pattern,
    as_pattern,
    check_pattern,
    pattern_density,
    pattern_mask,
    per_output_mask,
)
from sparsejax.core.topk import num_kept, topk_mask

SETTINGS = settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def reference_topk(values: np.ndarray, k: int) -> np.ndarray:
    """The k largest of a 1-D array, ties to the earlier index (a stable sort)."""
    order = np.lexsort((np.arange(values.size), -values.astype(np.float64)))
    kept = np.zeros(values.size, bool)
    kept[order[:k]] = True
    return kept


def scores_of(shape: tuple[int, ...], seed: int, ties: bool) -> np.ndarray:
    values = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.round(values) if ties else values  # rounding makes ties common


jitted_pattern_mask = jax.jit(pattern_mask, static_argnums=1)


@st.composite
def nm_cases(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m))
    groups = draw(st.sampled_from([1, 3]))
    shape = draw(st.sampled_from([(m * groups, 5), (2, 1, m * groups, 3)]))
    return shape, n, m, draw(st.integers(0, 2**16)), draw(st.booleans())


@SETTINGS
@given(nm_cases())
def test_every_nm_group_keeps_exactly_n_of_the_largest(case):
    shape, n, m, seed, ties = case
    scores = scores_of(shape, seed, ties)
    # jitted: one program per drawn shape and pattern (eagerly each of its ops compiled);
    # the eager call is checked by the tests below
    mask = np.asarray(jitted_pattern_mask(jnp.asarray(scores), f"{n}:{m}"))
    assert mask.shape == shape and mask.dtype == bool
    # groups of m consecutive entries along the input axis (-2)
    grouped_mask = np.moveaxis(mask, -2, -1).reshape(-1, m)
    grouped_scores = np.moveaxis(scores, -2, -1).reshape(-1, m)
    assert np.all(grouped_mask.sum(axis=1) == n)
    for kept, group in zip(grouped_mask, grouped_scores, strict=True):
        np.testing.assert_array_equal(kept, reference_topk(group, n))


def test_nm_along_another_axis_groups_that_axis():
    scores = scores_of((3, 8), 0, False)
    mask = np.asarray(pattern_mask(scores, "1:4@-1"))
    assert np.all(mask.reshape(3, 2, 4).sum(axis=-1) == 1)
    np.testing.assert_array_equal(mask[0, :4], reference_topk(scores[0, :4], 1))


def test_nm_ties_keep_the_first_along_the_axis():
    mask = np.asarray(pattern_mask(jnp.ones((4, 2)), "2:4"))
    np.testing.assert_array_equal(mask[:, 0], [True, True, False, False])


@pytest.mark.parametrize("shape,block", [((8, 12), 4), ((2, 3, 4, 6), 2)])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_block_mask_keeps_exactly_the_top_blocks(shape, block, density):
    scores = np.abs(scores_of(shape, 1, False))
    mask = np.asarray(pattern_mask(scores, f"block:{block}", density))
    *lead, rows, cols = shape
    tiles = mask.reshape(*lead, rows // block, block, cols // block, block)
    whole = tiles.all(axis=(-3, -1))
    assert np.array_equal(whole, tiles.any(axis=(-3, -1)))  # each block all or nothing
    sums = scores.reshape(*lead, rows // block, block, cols // block, block).sum(axis=(-3, -1))
    k = num_kept(density, sums.size)
    assert whole.sum() == k
    np.testing.assert_array_equal(whole.ravel(), reference_topk(sums.ravel(), k))


@pytest.mark.parametrize("density", [0.0, 0.25, 0.6, 1.0])
def test_channel_mask_keeps_exactly_the_top_output_channels(density):
    scores = np.abs(scores_of((2, 2, 3, 10), 2, False))
    mask = np.asarray(pattern_mask(scores, "channel", density))
    channels = mask.reshape(-1, 10)
    assert np.all(channels.all(axis=0) == channels.any(axis=0))
    k = num_kept(density, 10)
    expected = reference_topk(scores.reshape(-1, 10).sum(axis=0), k)
    np.testing.assert_array_equal(channels[0], expected)
    assert channels[0].sum() == k


def test_block_and_channel_rank_magnitudes_on_request():
    scores = jnp.array([[-5.0, 1.0], [-5.0, 1.0]])
    assert pattern_mask(scores, "channel", 0.5).tolist() == [[False, True]] * 2
    assert pattern_mask(scores, "channel", 0.5, by_magnitude=True).tolist() == [[True, False]] * 2


def test_unstructured_is_the_layer_topk():
    scores = scores_of((6, 5), 3, False)
    mask = np.asarray(pattern_mask(scores, "unstructured", 0.4))
    np.testing.assert_array_equal(mask.ravel(), reference_topk(scores.ravel(), 12))


@pytest.mark.parametrize("fan_in", [10, 40])  # a short row (pairwise ranks), a long one
def test_per_output_mask_keeps_the_same_count_in_every_output(fan_in):
    scores = scores_of((fan_in, 7), 4, True)
    mask = np.asarray(per_output_mask(scores, 0.3))
    for o in range(7):
        np.testing.assert_array_equal(mask[:, o], reference_topk(scores[:, o],
                                                                 num_kept(0.3, fan_in)))


def test_pattern_mask_works_under_jit():
    scores = jnp.asarray(scores_of((8, 4), 5, False))
    jitted = jax.jit(pattern_mask, static_argnames=("pattern",))
    for pattern, density in [("2:4", None), ("block:2", 0.5), ("channel", 0.5),
                             ("unstructured", 0.5)]:
        np.testing.assert_array_equal(jitted(scores, pattern, density),
                                      pattern_mask(scores, pattern, density))


def test_parse_round_trips_and_is_hashable():
    for text in ["unstructured", "2:4", "4:8", "1:4@-1", "block:4", "channel"]:
        assert str(as_pattern(text)) == text
        assert as_pattern(str(as_pattern(text))) == as_pattern(text)
    assert len({Pattern.parse("2:4"), NM(2, 4)}) == 1
    assert pattern_density("2:4", 0.5) == 0.5


@pytest.mark.parametrize("make,message", [
    (lambda: Pattern.parse("5:4"), "1 <= N <= M, got N=5, M=4"),
    (lambda: Pattern.parse("0:4"), "1 <= N <= M, got N=0, M=4"),
    (lambda: Pattern.parse("block:0"), "block size >= 1"),
    (lambda: Pattern.parse("2-4"), "unknown pattern '2-4'"),
    (lambda: pattern_mask(jnp.ones((6, 2)), "2:4"),
     "axis -2, whose length 6 .* not divisible by 4"),
    (lambda: pattern_mask(jnp.ones((4, 2)), "2:4@3"), "axis 3"),
    (lambda: pattern_mask(jnp.ones((4, 8)), "block:8", 0.5), "block 8x8 is larger"),
    (lambda: pattern_mask(jnp.ones((6, 8)), "block:4", 0.5), "block 4x4 does not divide"),
    (lambda: pattern_mask(jnp.ones((8, 2)), "2:4", 0.3), "fixes the density at 0.5"),
    (lambda: pattern_mask(jnp.ones((8,)), "2:4"), "rank >= 2"),
    (lambda: pattern_mask(jnp.ones((8,)), "channel", 0.5), "rank >= 2"),
    (lambda: pattern_mask(jnp.ones((4, 4)), "block:2"), "needs a density"),
    (lambda: pattern_mask(jnp.ones((4, 4)), "channel", 1.5), r"density must lie in \[0, 1\]"),
    (lambda: pattern_mask(jnp.array([[jnp.nan, 1.0], [1.0, 1.0]]), "1:2"), "non-finite"),
])
def test_impossible_combinations_are_named_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_check_pattern_names_every_bad_leaf_and_skips_unprunable_ones():
    params = {"fc1": {"kernel": np.zeros((8, 4)), "bias": np.zeros(3)},
              "fc2": {"kernel": np.zeros((6, 4)), "bias": np.zeros(4)},
              "conv": {"kernel": np.zeros((3, 3, 5, 4))}}
    with pytest.raises(ValueError, match="2 prunable leaves") as info:
        check_pattern("2:4", params)
    assert "fc2/kernel" in str(info.value) and "conv/kernel" in str(info.value)
    assert "fc1" not in str(info.value)
    ok = check_pattern("2:4", {"fc1": params["fc1"]}, density=0.5)
    assert ok == NM(2, 4)
    with pytest.raises(ValueError, match="fixes the density"):
        check_pattern("2:4", {"fc1": params["fc1"]}, density=0.25)
    check_pattern("channel", params)  # every kernel has output channels


def test_short_rows_rank_exactly_like_topk_mask():
    """N:M groups (rows of at most 16) are ranked by comparing pairs, not by topk_mask's
    search: the same masks, ties (many, and +-0, -inf) to the first entries."""
    from sparsejax.core.patterns import topk_rows

    rng = np.random.default_rng(0)
    for m in (2, 4, 8, 16):
        rows = rng.integers(-3, 4, size=(200, m)).astype(np.float32)  # many ties
        rows[rng.random(rows.shape) < 0.1] = -np.inf
        rows[rng.random(rows.shape) < 0.1] = -0.0
        counts = rng.integers(0, m + 1, size=200).astype(np.int32)
        fast = np.asarray(topk_rows(jnp.asarray(rows), jnp.asarray(counts)))
        for row, count, kept in zip(rows, counts, fast, strict=True):
            expected = np.asarray(topk_mask(jnp.asarray(row), count=int(count),
                                            check_finite_scores=False))
            np.testing.assert_array_equal(kept, expected)


def test_the_pattern_interface_itself_is_refused_with_the_way_to_build_one():
    """The old constructor, Pattern("nm", n=2, m=4), names the new spellings."""
    from sparsejax.core.patterns import WholeUnits

    for interface in (Pattern, WholeUnits):
        with pytest.raises(TypeError, match=r"Pattern.parse\('2:4'\) or as NM\(2, 4\)"):
            interface("nm", n=2, m=4) if interface is Pattern else interface()
    assert NM(2, 4) == Pattern.parse("2:4")
