"""Every method's ``update`` (and ``select_masks``) on sharded arrays, on current JAX's
sharding API (``jax.make_mesh``, ``AxisType``, ``jax.P``), with the 8 simulated CPU
devices of conftest.py:

* under ``jit`` on explicitly sharded state and gradients the update is global: masks
  bitwise equal to the unsharded update, counts exact;
* inside ``jax.shard_map`` with its default checks (``check_vma``) the update is per
  shard: each device's block equals the update of that block on its own.

The score methods (Edge-Popup, biprop, supermask + weights) keep warm-start cuts of their
top-k in ``state.extra['topk_cuts']`` (one row per leaf). Inside ``shard_map`` each device
searches its own block, so the cuts are per device: they travel with ``P(axis)`` over one
stack of rows per device (tests below), not replicated.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from toy_mlp import build_toy_method, fc_params

import sparsejax
from sparsejax.methods.supermask import TOPK_CUTS_KEY

N_DEVICES = 8

pytestmark = [pytest.mark.multidevice,
              pytest.mark.skipif(jax.device_count() < N_DEVICES,
                                 reason="needs 8 (simulated) devices")]

# Methods chosen at init from data (SNIP, GraSP, SynFlow) train like static afterwards;
# their init-time choice goes through select_masks, tested at the end. So does
# random_prune (static's fixed_mask update, random scores at init), and one-shot magnitude
# with a prune_step is scheduled_magnitude with one step: gradual_magnitude runs that code
# and prunes again at the update tested here.
OPTIONS = {
    "dense": {},
    "static": {"sparsity": 0.75},
    "set": {"sparsity": 0.75, "update_every": 1},
    "rigl": {"sparsity": 0.75, "update_every": 1, "end_step": 8},
    "snfs": {"sparsity": 0.75, "update_every": 1, "end_step": 8},
    "edge_popup": {"sparsity": 0.5},
    "biprop": {"sparsity": 0.5},
    "supermask_weights": {"sparsity": 0.5},
    "gates": {},
    "gradual_magnitude": {"sparsity": 0.75, "begin_step": 0, "end_step": 4, "frequency": 1},
}


def build(name):
    return build_toy_method(name, OPTIONS[name], batches_per_epoch=2)


def params():
    return fc_params(64, 16, 8, scale=1.0, key=jax.random.key(0))


def split(x):
    """Whether a leaf is split over the devices (along its first axis)."""
    return getattr(x, "ndim", 0) >= 2 and x.shape[0] % N_DEVICES == 0


def spec_of(path, x):
    if any(getattr(k, "key", None) == TOPK_CUTS_KEY for k in path):
        return jax.P("x")  # per-device cuts (one stack of rows per device)
    return jax.P("x") if split(x) else jax.P()


def per_device_cuts(state):
    """``state`` with its top-k cuts (if any) stacked once per device."""
    if TOPK_CUTS_KEY not in state.extra:
        return state
    cuts = state.extra[TOPK_CUTS_KEY]
    return state.replace(extra={**state.extra,
                                TOPK_CUTS_KEY: jnp.concatenate([cuts] * N_DEVICES)})


def block(tree, specs, i):
    """Device ``i``'s block of every leaf of ``tree`` split by ``specs``."""
    def take(x, spec):
        if spec == jax.P():
            return x
        return np.asarray(x).reshape(N_DEVICES, -1, *x.shape[1:])[i]
    return jax.tree_util.tree_map(take, tree, specs)


def start(method):
    """A state one update in (so the masks have moved) and gradients for the next."""
    state = method.init(params(), jax.random.key(1))
    grads = jax.tree_util.tree_map(lambda x: jnp.cos(jnp.arange(x.size, dtype=jnp.float32)
                                                     ).reshape(x.shape),
                                   method.trainables(state))
    return jax.jit(method.update)(state, grads), grads


def hard_masks(method, state):
    return [np.asarray(m) for m in jax.tree_util.tree_leaves(method.hard_masks(state))]


@pytest.fixture(scope="module")
def explicit_mesh():
    return jax.make_mesh((N_DEVICES,), ("x",), axis_types=(AxisType.Explicit,))


@pytest.fixture(scope="module")
def manual_mesh():
    return jax.make_mesh((N_DEVICES,), ("x",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_update_sharded(name, explicit_mesh, manual_mesh):
    method = build(name)
    state, grads = start(method)
    update = jax.jit(method.update)
    expected = update(state, grads)

    # explicit sharding under jit: global, bitwise the unsharded masks, exact counts
    def put(x):
        spec = jax.P("x") if split(x) else jax.P()
        return jax.device_put(x, NamedSharding(explicit_mesh, spec))

    with jax.set_mesh(explicit_mesh):
        sharded = update(jax.tree_util.tree_map(put, state), jax.tree_util.tree_map(put, grads))
    assert sharded.params["fc1"]["kernel"].sharding.spec == jax.P("x", None)  # still split
    for got, want in zip(hard_masks(method, sharded), hard_masks(method, expected),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    if name in ("static", "set", "rigl", "snfs"):  # exact global counts
        kept = sum(int(m.sum()) for m in hard_masks(method, sharded))
        assert kept == sum(int(m.sum()) for m in hard_masks(method, state))

    # inside shard_map (default checks): per shard, each block updated on its own
    state = per_device_cuts(state)
    specs = jax.tree_util.tree_map_with_path(spec_of, state)
    grad_specs = jax.tree_util.tree_map_with_path(spec_of, grads)
    new = jax.jit(jax.shard_map(method.update, mesh=manual_mesh,
                                in_specs=(specs, grad_specs), out_specs=specs))(state, grads)
    for i in (0, N_DEVICES - 1):
        alone = update(block(state, specs, i), block(grads, grad_specs, i))
        ours = block(new, specs, i)
        for got, want in zip(hard_masks(method, ours), hard_masks(method, alone),
                             strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(jax.tree_util.tree_leaves(ours.params),
                             jax.tree_util.tree_leaves(alone.params), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_select_masks_sharded(explicit_mesh, manual_mesh):
    scores = jax.tree_util.tree_map(jnp.abs, params())
    expected = sparsejax.select_masks(scores, 0.25, "uniform")
    with jax.set_mesh(explicit_mesh):
        sharded = jax.tree_util.tree_map(lambda x: jax.device_put(
            x, NamedSharding(explicit_mesh, jax.P("x") if split(x) else jax.P())), scores)
        got = jax.jit(lambda s: sparsejax.select_masks(s, 0.25, "uniform"))(sharded)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    specs = jax.tree_util.tree_map_with_path(spec_of, scores)
    per_shard = jax.jit(jax.shard_map(lambda s: sparsejax.select_masks(s, 0.25, "uniform"),
                                      mesh=manual_mesh, in_specs=(specs,),
                                      out_specs=specs))(scores)
    kernel = np.asarray(per_shard["fc1"]["kernel"]).reshape(N_DEVICES, -1)
    assert (kernel.sum(axis=1) == sparsejax.num_kept(0.25, 64 * 16 // N_DEVICES)).all()
