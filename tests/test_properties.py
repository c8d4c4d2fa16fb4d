"""Property-based tests of the core invariants on random pytrees, shapes and densities."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import layer_densities, num_kept, select_masks, topk_mask

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# A few shapes only: each new shape costs a compilation, the values carry the variety.
shapes = st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)])
densities = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def score_arrays(draw):
    shape = draw(shapes)
    size = math.prod(shape)
    # few distinct values so that ties are common
    values = draw(st.lists(st.sampled_from([-2.0, -0.0, 0.0, 0.5, 0.5, 1.0, 3.0]) | st.floats(
        -1e6, 1e6, allow_nan=False, width=32), min_size=size, max_size=size))
    return np.asarray(values, np.float32).reshape(shape)


@st.composite
def param_trees(draw):
    n_leaves = draw(st.integers(1, 4))
    tree = {}
    for i in range(n_leaves):
        rows, cols = draw(st.sampled_from([(1, 3), (4, 4), (12, 5), (7, 2)]))
        tree[f"layer{i}"] = {"kernel": np.zeros((rows, cols), np.float32),
                             "bias": np.zeros((cols,), np.float32)}
    return tree


@SETTINGS
@given(score_arrays(), densities)
def test_topk_keeps_exactly_k_largest_with_position_ties(scores, density):
    mask = np.asarray(topk_mask(jnp.asarray(scores), density))
    k = num_kept(density, scores.size)
    assert mask.dtype == bool and int(mask.sum()) == k
    flat = scores.ravel().astype(np.float64) + 0.0  # -0.0 == 0.0
    flat[np.abs(flat) < np.finfo(np.float32).tiny] = 0.0  # subnormals rank as zero
    order = np.lexsort((np.arange(flat.size), -flat))
    expected = np.zeros(flat.size, bool)
    expected[order[:k]] = True
    np.testing.assert_array_equal(mask.ravel(), expected)


@SETTINGS
@given(st.lists(score_arrays(), min_size=1, max_size=3), densities)
def test_global_topk_counts_over_leaves(leaves, density):
    masks = topk_mask(list(map(jnp.asarray, leaves)), density, scope="global")
    total = sum(leaf.size for leaf in leaves)
    assert sum(int(m.sum()) for m in masks) == num_kept(density, total)


@SETTINGS
@given(param_trees(), densities, st.sampled_from(["uniform", "erk", "erdos_renyi"]))
def test_distribution_totals_are_exact_and_in_range(params, density, distribution):
    d = layer_densities(params, density, distribution)
    kernels = [(v["kernel"].size, d[k]["kernel"]) for k, v in params.items()]
    assert all(0.0 <= x <= 1.0 for _, x in kernels)
    assert all(d[k]["bias"] == 1.0 for k in params)
    kept = sum(round(x * n) for n, x in kernels)
    assert kept == num_kept(density, sum(n for n, _ in kernels))


@SETTINGS
@given(param_trees(), densities, st.sampled_from(["uniform", "erk", "global"]),
       st.integers(0, 2**16))
def test_select_masks_exact_binary_and_matching_structure(params, density, distribution, seed):
    scores = sparsejax.methods.random_scores(params, jax.random.PRNGKey(seed))
    masks = select_masks(scores, density, distribution)
    sparsejax.check_same_structure(params, masks)
    chex.assert_trees_all_equal_shapes(params, masks)
    chex.assert_type(jax.tree_util.tree_leaves(masks), bool)
    kept = sum(int(masks[k]["kernel"].sum()) for k in params)
    assert kept == num_kept(density, sum(v["kernel"].size for v in params.values()))
    assert all(bool(masks[k]["bias"].all()) for k in params)


@SETTINGS
@given(param_trees(), st.floats(0.0, 0.95), st.integers(0, 2**16))
def test_apply_masks_zeroes_exactly_the_pruned_entries(params, sparsity, seed):
    key = jax.random.PRNGKey(seed)
    params = jax.tree_util.tree_map(lambda p: jax.random.normal(key, p.shape) + 5.0, params)
    masks = select_masks(params, 1.0 - sparsity, "uniform")
    masked = sparsejax.apply_masks(params, masks)
    expected = jax.tree_util.tree_map(lambda p, m: np.where(m, p, np.float32(0)), params, masks)
    chex.assert_trees_all_equal(masked, expected, strict=True)


def _random_grads(params, seed):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, np.shape(x)) for k, x in zip(keys, leaves, strict=True)])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(param_trees(), st.sampled_from([0.5, 0.8, 0.95]), st.integers(0, 2**16),
       st.sampled_from(["set", "rigl", "snfs"]))
def test_prune_and_regrow_keeps_active_counts_and_binary_masks(params, sparsity, seed, name):
    import optax

    params = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.PRNGKey(seed), p.shape), params)
    method = sparsejax.get_method(name, optax.sgd(0.1, momentum=0.9), sparsity=sparsity,
                                  update_every=1, total_steps=100, end_step=50)
    state = method.init(params, jax.random.PRNGKey(seed))
    update = jax.jit(method.update)
    before = [int(m.sum()) for m in jax.tree_util.tree_leaves(state.masks)]
    for step in range(3):
        state = update(state, _random_grads(params, seed + step))
        masks = jax.tree_util.tree_leaves(state.masks)
        counts = [int(m.sum()) for m in masks]
        assert all(m.dtype == jnp.bool_ for m in masks)
        if name == "snfs":  # redistributes across layers: the total is constant
            assert sum(counts) == sum(before)
        else:
            assert counts == before
        for p, m in zip(jax.tree_util.tree_leaves(state.params), masks, strict=True):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(param_trees(), st.sampled_from([0.3, 0.5, 0.9]), st.integers(0, 2**16),
       st.sampled_from(["edge_popup", "biprop", "gates"]))
def test_strong_ticket_weights_stay_bitwise_frozen(params, sparsity, seed, name):
    import optax

    extra = {"total_steps": 100} if name == "gates" else {}
    method = sparsejax.get_method(name, optax.sgd(0.1, momentum=0.9), sparsity=sparsity,
                                  **extra)
    state = method.init(jax.tree_util.tree_map(jnp.asarray, params), jax.random.PRNGKey(seed))
    frozen = jax.tree_util.tree_map(np.asarray, state.params)
    update = jax.jit(method.update)
    for step in range(3):
        state = update(state, _random_grads(method.trainables(state), seed + step))
    chex.assert_trees_all_equal(frozen, state.params)  # bitwise
    chex.assert_type(jax.tree_util.tree_leaves(method.hard_masks(state)), bool)
