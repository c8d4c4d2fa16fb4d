"""Sparsity patterns through the mask-choosing methods (issue 20): select_masks (static and
the one-shot pruners), SET / RigL / SNFS regrowth, Edge-Popup / biprop per-step top-k."""

import hashlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_mlp import batches, mlp_loss, mlp_params

from sparsejax import get_method, make_train_step, stateless_loss
from sparsejax.core.distributions import kept_counts, select_masks
from sparsejax.core.patterns import (
    Unstructured,
    as_pattern,
    nm_group_topk,
    nm_groups,
    pattern_mask,
)
from sparsejax.core.ste import supermask
from sparsejax.core.topk import topk_mask
from sparsejax.harness.training.loop import TrainConfig, build_method
from sparsejax.methods import METHODS, InitContext
from sparsejax.methods.dst import (
    RegrowRules,
    Signals,
    gradient_grow,
    magnitude_drop,
    regrow_masks,
    rigl,
    round_fraction,
    same_leaf,
)
from sparsejax.methods.fixed import random_scores
from sparsejax.methods.strong import biprop, edge_popup

KERNELS = (("Dense_0", "kernel"), ("Dense_1", "kernel"))
P24 = as_pattern("2:4")


def group_counts(mask, pattern=P24):
    return np.asarray(nm_groups(jnp.asarray(mask).astype(jnp.int32), pattern).sum(axis=1))


def assert_nm(mask, n=2, pattern=P24):
    counts = group_counts(mask, pattern)
    assert counts.size > 0 and np.all(counts == n), np.unique(counts)


# ---------------------------------------------------------------------------- select_masks


def test_select_masks_nm_keeps_exactly_n_per_group_and_ignores_distribution():
    scores = random_scores(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    by_erk = select_masks(scores, 0.5, "erk", pattern="2:4")
    for layer, leaf in KERNELS:
        mask = by_erk[layer][leaf]
        assert_nm(mask)
        # the top 2 of each group of 4 inputs, per output: a hand computation
        s = np.asarray(scores[layer][leaf])
        rows = np.moveaxis(s, -2, -1).reshape(-1, 4)
        expected = np.zeros_like(rows, bool)
        top2 = np.argsort(-rows, axis=1, kind="stable")[:, :2]
        np.put_along_axis(expected, top2, True, axis=1)
        np.testing.assert_array_equal(np.asarray(nm_groups(mask, P24)), expected)
    for layer in ("Dense_0", "Dense_1"):  # biases are not prunable: kept whole
        assert bool(jnp.all(by_erk[layer]["bias"]))
    for distribution in ("uniform", "erdos_renyi", "global"):  # the distribution is moot
        other = select_masks(scores, 0.5, distribution, pattern="2:4")
        jax.tree_util.tree_map(np.testing.assert_array_equal, by_erk, other)


def test_select_masks_nm_under_jit_and_with_a_dense_override():
    params = {"a": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 6))},
              "head": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (6, 3))}}
    # head's 6 inputs cannot hold 2:4, but the override keeps it dense, so it is no error
    masks = jax.jit(lambda s: select_masks(s, 0.5, pattern="2:4",
                                           overrides={"head/kernel": 1.0}))(params)
    assert_nm(masks["a"]["kernel"])
    assert bool(jnp.all(masks["head"]["kernel"]))
    with pytest.raises(ValueError, match="only keep a leaf dense"):
        select_masks(params, 0.5, pattern="2:4", overrides={"head/kernel": 0.25})


def test_select_masks_block_and_channel_follow_the_distribution():
    scores = random_scores(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    counts = kept_counts(scores, 0.5, "uniform").per_leaf
    leaves = jax.tree_util.tree_leaves(scores)
    block = select_masks(scores, 0.5, "uniform", pattern="block:4")
    channel = select_masks(scores, 0.5, "uniform", pattern="channel")
    for i, (b, c) in enumerate(zip(jax.tree_util.tree_leaves(block),
                                   jax.tree_util.tree_leaves(channel), strict=True)):
        if counts[i] is None:
            assert bool(jnp.all(b)) and bool(jnp.all(c))
            continue
        density = counts[i] / leaves[i].size
        np.testing.assert_array_equal(b, pattern_mask(leaves[i], "block:4", density))
        np.testing.assert_array_equal(c, pattern_mask(leaves[i], "channel", density))
        rows, cols = b.shape
        tiles = np.asarray(b).reshape(rows // 4, 4, cols // 4, 4)
        assert np.all(tiles.all(axis=(1, 3)) | ~tiles.any(axis=(1, 3)))  # whole blocks
        assert np.all(np.asarray(c).all(axis=0) | ~np.asarray(c).any(axis=0))  # whole columns


def test_select_masks_unstructured_default_is_the_old_selection():
    """The default path is today's: per-leaf ``topk_mask(count=...)`` of the counts the
    distribution gives, and one joint top-k for 'global'; ``pattern='unstructured'`` is
    the same call."""
    scores = random_scores(mlp_params(jax.random.PRNGKey(3)), jax.random.PRNGKey(4))
    leaves = jax.tree_util.tree_leaves(scores)
    for distribution in ("erk", "uniform", "global"):
        counts = kept_counts(scores, 0.3, distribution)
        expected = [jnp.ones(leaf.shape, bool) if c is None else topk_mask(leaf, count=c)
                    for leaf, c in zip(leaves, counts.per_leaf, strict=True)]
        if counts.shared:
            joint = topk_mask([leaves[i] for i in counts.shared], count=counts.shared_count,
                              scope="global")
            for i, m in zip(counts.shared, joint, strict=True):
                expected[i] = m
        for got in (select_masks(scores, 0.3, distribution),
                    select_masks(scores, 0.3, distribution, pattern="unstructured"),
                    select_masks(scores, 0.3, distribution, pattern=Unstructured())):
            for g, e in zip(jax.tree_util.tree_leaves(got), expected, strict=True):
                np.testing.assert_array_equal(g, e)


def test_select_masks_impossible_combinations_name_the_leaf():
    params = {"fc1": {"kernel": jnp.ones((8, 4))}, "head": {"kernel": jnp.ones((6, 2))}}
    with pytest.raises(ValueError, match=r"head/kernel: .*length 6.*not divisible by 4"):
        select_masks(params, 0.5, pattern="2:4")
    with pytest.raises(ValueError, match=r"fixes the density at 0.5"):
        select_masks({"fc1": params["fc1"]}, 0.3, pattern="2:4")
    with pytest.raises(ValueError, match=r"N:M pattern needs 1 <= N <= M"):
        select_masks(params, 0.5, pattern="5:4")
    with pytest.raises(ValueError, match=r"head/kernel: block 4x4 is larger than"):
        select_masks(params, 0.5, "uniform", pattern="block:4")
    with pytest.raises(ValueError, match=r"distribution 'global' ranks single weights"):
        select_masks({"fc1": params["fc1"]}, 0.5, "global", pattern="block:2")


# ---------------------------------------------------------------------------- DST


def test_nm_group_topk_keeps_the_given_count_per_group():
    s = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    counts = jnp.array([0, 1, 2, 3, 4, 1])
    mask = nm_group_topk(s, "2:4", counts)
    np.testing.assert_array_equal(group_counts(mask), np.asarray(counts))
    rows, kept = np.asarray(nm_groups(s, P24)), np.asarray(nm_groups(mask, P24))
    for r, k, c in zip(rows, kept, np.asarray(counts), strict=True):
        assert set(np.flatnonzero(k)) == set(np.argsort(-r, kind="stable")[:c])


def test_regrow_masks_nm_drops_globally_and_regrows_within_the_group():
    # one output, two groups of 4 inputs; group 0 holds the two smallest weights
    params = jnp.array([0.01, 0.02, 0.0, 0.0, 0.9, 0.8, 0.0, 0.0])[:, None]
    masks = jnp.array([1, 1, 0, 0, 1, 1, 0, 0], bool)[:, None]
    grads = jnp.array([0.0, 0.0, 0.3, 0.5, 0.0, 0.0, 0.9, 0.9])[:, None]
    signals = Signals([params], [masks], [grads], None, jax.random.PRNGKey(0))
    rules = RegrowRules(magnitude_drop, gradient_grow, round_fraction, same_leaf)
    new, n_drop, n_grow = regrow_masks(rules, signals, jnp.float32(0.5), P24)
    # the two smallest |w| (both in group 0) go; group 0 grows its two largest gradients,
    # group 1, which lost none, grows none (its large gradients do not move weights
    # across groups)
    np.testing.assert_array_equal(np.asarray(new[0]).ravel(),
                                  [0, 0, 1, 1, 1, 1, 0, 0])
    assert int(n_drop[0]) == int(n_grow[0]) == 2
    # unstructured, the same signals would grow group 1's gradients instead
    free, _, _ = regrow_masks(rules, signals, jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(free[0]).ravel(), [0, 0, 0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("name", ["rigl", "set", "snfs"])
def test_dst_with_nm_keeps_every_group_at_n_through_jitted_updates(name):
    options = {"rigl": dict(update_every=2, end_step=16, total_steps=20),
               "set": dict(update_every=2, total_steps=20),
               "snfs": dict(update_every=2, total_steps=20)}[name]
    method = get_method(name, optax.sgd(0.1, momentum=0.9), sparsity=0.5, pattern="2:4",
                        **options)
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    state = jax.jit(method.init)(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    start = jax.tree_util.tree_map(np.asarray, state.masks)
    for layer, leaf in KERNELS:
        assert_nm(state.masks[layer][leaf])
    xs, ys = batches(8)
    for i in range(8):
        state, _ = step(state, (xs[i], ys[i]))
        for layer, leaf in KERNELS:
            assert_nm(state.masks[layer][leaf])
            # inactive weights stay exactly zero
            assert not np.any(np.asarray(state.params[layer][leaf])[
                ~np.asarray(state.masks[layer][leaf])])
    moved = sum(int(np.sum(start[layer][leaf] != np.asarray(state.masks[layer][leaf])))
                for layer, leaf in KERNELS)
    assert moved > 0, "the masks never moved"


def run_toy(make_method, steps):
    """Train ``make_method()`` on the toy MLP for ``steps`` jitted steps; the final state."""
    method = make_method()
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    xs, ys = batches(steps)
    for i in range(steps):
        state, _ = step(state, (xs[i], ys[i]))
    return state


# RigL's state after 6 steps below, computed with the engine before patterns existed
# (sparsejax/ at commit 402fcc890e9499c6bcf257dcdb5447bd5a16cfe2, run from a scratch
# script with the same toy MLP, seeds and options): per kernel, the active count, the
# sha256 of np.packbits(mask) and three active weights (the first three in row-major order).
RIGL_BASE = {
    "Dense_0": (50, "32df1f2344290bc454a400319e052625341f639cd9b7713417ab82fa45e1996e",
                {(0, 2): -0.22502614557743073, (0, 6): 0.22306659817695618,
                 (0, 9): -0.5477299094200134}),
    "Dense_1": (27, "611bf33c02a0d69a0683fb798fce584f8b7984fc0ff38ff2f8b2556f1ddb0c01",
                {(0, 1): -0.6149784326553345, (0, 3): -0.11672493070363998,
                 (1, 0): -0.2304341346025467}),
}


@pytest.mark.parametrize("extra", [{}, {"pattern": "unstructured"}], ids=["default", "explicit"])
def test_rigl_unstructured_matches_the_engine_before_patterns(extra):
    """No pattern and ``pattern='unstructured'`` give the pre-pattern engine's masks and
    weights (recorded above), not merely each other's."""
    state = run_toy(lambda: rigl(optax.sgd(0.1, momentum=0.9), sparsity=0.8, update_every=2,
                                 end_step=8, total_steps=10, **extra), 6)
    for layer, (count, digest, weights) in RIGL_BASE.items():
        mask = np.asarray(state.masks[layer]["kernel"])
        assert int(mask.sum()) == count
        assert hashlib.sha256(np.packbits(mask).tobytes()).hexdigest() == digest
        kernel = np.asarray(state.params[layer]["kernel"])
        assert [tuple(int(j) for j in i) for i in np.argwhere(mask)[:3]] == list(weights)
        np.testing.assert_allclose([kernel[i] for i in weights], list(weights.values()),
                                   rtol=1e-6)
        assert not np.any(kernel[~mask])
        np.testing.assert_array_equal(state.masks[layer]["bias"], True)


def test_dst_pattern_errors():
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"rigl: pattern 2:4 fixes the density at 0.5"):
        rigl(sgd, sparsity=0.8, total_steps=10, pattern="2:4")
    with pytest.raises(ValueError, match=r"rigl: .*distribution 'global' ranks single"):
        rigl(sgd, sparsity=0.5, total_steps=10, distribution="global",
             pattern="block:4").init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match=r"N:M pattern needs 1 <= N <= M, got N=3, M=2"):
        rigl(sgd, sparsity=0.5, total_steps=10, pattern="3:2")
    method = rigl(sgd, sparsity=0.5, total_steps=10, pattern="4:8")
    with pytest.raises(ValueError, match=r"rigl: .*Dense_0/kernel: .*length 20.*"
                                         r"not divisible by 8"):
        method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))


@pytest.mark.parametrize("name", ["static", "rigl", "edge_popup", "magnitude",
                                  "random_prune", "snip"])
def test_build_method_passes_the_pattern_option(name):
    assert "pattern" in inspect.signature(METHODS[name]).parameters
    config = TrainConfig(method=name, sparsity=0.5, method_options={"pattern": "2:4"})
    method = build_method(config, optax.sgd(0.1), total_steps=10, batches_per_epoch=5)
    xs, ys = batches(1)
    context = InitContext(stateless_loss(mlp_loss), ((xs[0], ys[0]),))
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
                        context=context)
    for layer, leaf in KERNELS:
        assert_nm(state.masks[layer][leaf])


def test_one_shot_pattern_errors():
    with pytest.raises(ValueError, match="static: pattern 2:4 fixes the density at 0.5"):
        get_method("static", optax.sgd(0.1), sparsity=0.9, pattern="2:4")
    with pytest.raises(ValueError, match="snip: pattern 2:4 fixes the density at 0.5"):
        get_method("snip", optax.sgd(0.1), sparsity=0.75, pattern="2:4")
    with pytest.raises(ValueError, match="magnitude: pattern 2:4 fixes the density at 0.5"):
        get_method("magnitude", optax.sgd(0.1), sparsity=0.7, prune_step=5, pattern="2:4")


# ---------------------------------------------------------------------------- strong


@pytest.mark.parametrize("builder", [edge_popup, biprop])
def test_score_methods_with_nm_choose_n_per_group_every_step(builder):
    method = builder(optax.sgd(0.5, momentum=0.9), sparsity=0.5, pattern="2:4")
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    first = {p: np.asarray(pattern_mask(s, "2:4", by_magnitude=True))
             for p, s in state.scores.items()}
    xs, ys = batches(6)
    for i in range(6):
        state, _ = step(state, (xs[i], ys[i]))
        effective = method.effective_params(state)
        for layer, leaf in KERNELS:
            w = np.asarray(effective[layer][leaf])
            assert_nm(w != 0)  # signed-constant / kaiming weights are never zero
            expected = pattern_mask(state.scores[f"{layer}/{leaf}"], "2:4", by_magnitude=True)
            np.testing.assert_array_equal(state.masks[layer][leaf], expected)
    moved = sum(int(np.sum(first[p] != np.asarray(pattern_mask(s, "2:4", by_magnitude=True))))
                for p, s in state.scores.items())
    assert moved > 0, "the per-group top-k never changed"


def test_edge_popup_unstructured_default_is_unchanged():
    def run(**extra):
        return run_toy(lambda: edge_popup(optax.sgd(0.5, momentum=0.9), sparsity=0.7,
                                          **extra), 4)

    default, explicit = run(), run(pattern="unstructured")
    for a, b in zip(jax.tree_util.tree_leaves((default.masks, default.scores, default.extra)),
                    jax.tree_util.tree_leaves((explicit.masks, explicit.scores,
                                               explicit.extra)), strict=True):
        np.testing.assert_array_equal(a, b)
    # and the masks are today's: the per-leaf top-k of |scores| at density 0.3
    for path, scores in default.scores.items():
        layer, leaf = path.split("/")
        np.testing.assert_array_equal(default.masks[layer][leaf],
                                      topk_mask(scores, 0.3, by_magnitude=True))


def test_score_method_pattern_errors():
    sgd = optax.sgd(0.1)
    params = mlp_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"edge_popup: pattern 2:4 fixes the density"):
        edge_popup(sgd, sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match=r"scope='global'"):
        edge_popup(sgd, sparsity=0.5, scope="global", pattern="2:4")
    with pytest.raises(ValueError, match=r"ramp"):
        biprop(sgd, sparsity=0.5, ramp_epochs=1, batches_per_epoch=10, pattern="2:4")
    with pytest.raises(ValueError, match=r"edge_popup: .*Dense_1/kernel: block 8x8 is "
                                         r"larger than"):
        edge_popup(sgd, sparsity=0.5, pattern="block:8").init(params, jax.random.PRNGKey(1))


def test_supermask_with_a_pattern_is_straight_through():
    w = jnp.arange(1.0, 9.0).reshape(4, 2)
    s = jnp.array([[0.1, -0.9], [-0.5, 0.2], [0.3, 0.1], [0.2, 0.8]])
    out = supermask(w, s, None, pattern="2:4")
    mask = np.asarray(out != 0)
    np.testing.assert_array_equal(mask.T, [[0, 1, 1, 0], [1, 0, 0, 1]])
    grad = jax.grad(lambda s: supermask(w, s, 0.5, pattern="2:4").sum())(s)
    np.testing.assert_array_equal(grad, w * jnp.sign(s))
