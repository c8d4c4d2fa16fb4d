"""Exact top-k on sharded scores: per shard inside ``shard_map`` (with its default
``check_vma``), global and bitwise equal to the unsharded result under ``jit`` on
explicitly sharded arrays. Needs the 8 simulated CPU devices of conftest.py.

The ``shard_map`` calls are jitted (as in a train step): called eagerly, each op of the
search inside them compiled a program of its own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sparsejax
from sparsejax.core.topk import topk_mask_tracked
from sparsejax.core.topk_search import SAMPLE_SIZE

N_DEVICES = 8

pytestmark = pytest.mark.skipif(jax.device_count() < N_DEVICES,
                                reason="needs 8 (simulated) devices")


def scores_tree():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "a": jax.random.normal(k[0], (64, 32)),  # 256 per shard: the bitwise search
        "b": jax.random.normal(k[1], (512, 64)),  # 4096 per shard: the sampled search
        # Integers 0..3: ties straddle every cut, so the tie ranking (cumsum) runs.
        "c": jnp.floor(jax.random.uniform(k[2], (256, 16)) * 4),
    }


def blocks(tree, i):
    """Device ``i``'s block of every leaf of ``tree`` (sharded along axis 0)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape(
        N_DEVICES, -1, *x.shape[1:])[i], tree)


def per_block(fn, tree):
    """``fn`` applied to each device's block apart, reassembled along axis 0."""
    outs = [fn(blocks(tree, i)) for i in range(N_DEVICES)]
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)


def assert_trees_equal(actual, expected):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected),
                    strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope="module")
def manual_mesh():
    return jax.make_mesh((N_DEVICES,), ("x",), axis_types=(AxisType.Auto,))


@pytest.fixture(scope="module")
def explicit_mesh():
    return jax.make_mesh((N_DEVICES,), ("x",), axis_types=(AxisType.Explicit,))


def test_shard_map_layer_topk_is_per_shard(manual_mesh):
    tree = scores_tree()
    masks = jax.jit(jax.shard_map(lambda s: sparsejax.topk_mask(s, 0.3), mesh=manual_mesh,
                                  in_specs=P("x"), out_specs=P("x")))(tree)
    assert_trees_equal(masks, per_block(lambda s: sparsejax.topk_mask(s, 0.3), tree))
    for name, mask in masks.items():
        block_size = tree[name].size // N_DEVICES
        per_shard = np.asarray(mask).reshape(N_DEVICES, -1).sum(axis=1)
        assert (per_shard == sparsejax.num_kept(0.3, block_size)).all(), name


def test_shard_map_global_and_tracked_topk_are_per_shard(manual_mesh):
    tree = scores_tree()
    masks = jax.jit(jax.shard_map(
        lambda s: sparsejax.topk_mask(s, count=500, scope="global"),
        mesh=manual_mesh, in_specs=P("x"), out_specs=P("x")))(tree)
    assert_trees_equal(masks, per_block(
        lambda s: sparsejax.topk_mask(s, count=500, scope="global"), tree))
    kept = sum(np.asarray(m).reshape(N_DEVICES, -1).sum(axis=1) for m in masks.values())
    assert (kept == 500).all()
    # Replicated cuts (not varying over the mesh) seed a per-shard search.
    cuts = jnp.array([[0.5, 0.1]] * 3, jnp.float32)
    tracked = jax.jit(jax.shard_map(lambda s, c: topk_mask_tracked(
        s, 0.2, c, sampled_above=SAMPLE_SIZE)[0],
                                    mesh=manual_mesh, in_specs=(P("x"), P()),
                                    out_specs=P("x")))(tree, cuts)
    assert_trees_equal(tracked, per_block(lambda s: sparsejax.topk_mask(s, 0.2), tree))


def test_explicit_sharding_topk_is_global_and_exact(explicit_mesh):
    tree = scores_tree()
    expected_density = sparsejax.topk_mask(tree, 0.3)
    expected_count = sparsejax.topk_mask(tree["c"], count=777)
    expected_global = sparsejax.topk_mask(tree, 0.2, scope="global")
    expected_magnitude = sparsejax.topk_mask(tree["b"], 0.1, by_magnitude=True)
    with jax.set_mesh(explicit_mesh):
        sharded = jax.device_put(tree, NamedSharding(explicit_mesh, P("x")))
        by_density = jax.jit(lambda s: sparsejax.topk_mask(s, 0.3))(sharded)
        by_count = jax.jit(lambda s, c: sparsejax.topk_mask(s, count=c))(
            sharded["c"], jnp.int32(777))
        joint = jax.jit(lambda s: sparsejax.topk_mask(s, 0.2, scope="global"))(sharded)
        magnitude = jax.jit(lambda s: sparsejax.topk_mask(s, 0.1, by_magnitude=True))(
            sharded["b"])
    assert_trees_equal(by_density, expected_density)
    assert_trees_equal(by_count, expected_count)
    assert_trees_equal(joint, expected_global)
    assert_trees_equal(magnitude, expected_magnitude)
    for name, mask in by_density.items():
        assert int(mask.sum()) == sparsejax.num_kept(0.3, tree[name].size)
        assert mask.sharding.is_equivalent_to(sharded[name].sharding, mask.ndim)  # still sharded
    assert int(by_count.sum()) == 777
    total = sum(x.size for x in tree.values())
    assert sum(int(m.sum()) for m in joint.values()) == sparsejax.num_kept(0.2, total)


def test_explicit_sharding_without_a_mesh_context(explicit_mesh):
    ties = scores_tree()["c"]
    sharded = jax.device_put(ties, NamedSharding(explicit_mesh, P("x")))
    masks = jax.jit(lambda s: sparsejax.topk_mask(s, 0.3))(sharded)
    assert_trees_equal(masks, sparsejax.topk_mask(ties, 0.3))
