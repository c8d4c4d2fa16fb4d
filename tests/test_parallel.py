"""Data parallelism on 8 simulated CPU devices (XLA_FLAGS set in the root conftest.py):
masks identical on every device, results equal to a single-device run on the same global
batch, and checkpoints that move between device counts."""

import jax
import numpy as np
import optax
import pytest
from toy_mlp import build_toy_method, fc_loss, fc_params

import sparsejax
from sparsejax.engine import stateless_loss
from sparsejax.engine.parallel import (
    PmapTrainer,
    ShardedTrainer,
    SingleDeviceTrainer,
    make_mesh,
    make_trainer,
    split_batch,
)
from sparsejax.io.checkpoint import Checkpointer

pytestmark = pytest.mark.multidevice

N_DEVICES = jax.device_count()
if N_DEVICES < 8:
    pytest.skip("needs 8 simulated devices", allow_module_level=True)

GLOBAL_BATCH = 32

# method name -> builder options; methods from later families join when registered
METHOD_OPTIONS = {
    "dense": {},
    "static": {"sparsity": 0.8},
    "set": {"sparsity": 0.8, "update_every": 2},
    "rigl": {"sparsity": 0.8, "update_every": 2, "end_step": 8},
    "edge_popup": {"sparsity": 0.5},
    "gates": {},
}
AVAILABLE = [name for name in METHOD_OPTIONS if name in sparsejax.METHODS]


def params():
    return fc_params(20, 32, 4)


mlp_loss = fc_loss


def batches(n):
    key = jax.random.PRNGKey(7)
    xs = np.asarray(jax.random.normal(key, (n, GLOBAL_BATCH, 20)))
    ys = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (n, GLOBAL_BATCH), 0, 4))
    return [{"x": xs[i], "y": ys[i]} for i in range(n)]


def build(name):
    return build_toy_method(name, METHOD_OPTIONS[name], batches_per_epoch=2)


def run(trainer, method, steps, state=None, first_batch=0):
    state = method.init(params(), jax.random.PRNGKey(1)) if state is None else state
    state = trainer.put_state(state)
    for batch in batches(first_batch + steps)[first_batch:]:
        state, _ = trainer.step(state, trainer.put_batch(batch))
    return state


_SINGLE_DEVICE = {}


def single_device_run(name):
    """The single-device reference: ``name`` trained 6 steps from the start, run once per
    module (the pmap, sharded and checkpoint tests all compare against it)."""
    if name not in _SINGLE_DEVICE:
        method = build(name)
        _SINGLE_DEVICE[name] = run(SingleDeviceTrainer(method, stateless_loss(mlp_loss)),
                                   method, steps=6)
    return _SINGLE_DEVICE[name]


def assert_close(method, a, b):
    np.testing.assert_array_equal(int(a.step), int(b.step))
    for x, y in zip(jax.tree_util.tree_leaves(method.hard_masks(a)),
                    jax.tree_util.tree_leaves(method.hard_masks(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.scores)),
                    jax.tree_util.tree_leaves((b.params, b.scores)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", AVAILABLE)
def test_pmap_masks_identical_on_all_devices_and_equal_single_device(name):
    method = build(name)
    loss = stateless_loss(mlp_loss)
    pmap = PmapTrainer(method, loss)
    replicated = run(pmap, method, steps=6)
    # the hard masks (the gates derive theirs from their parameters), on every device
    for leaf in jax.tree_util.tree_leaves(jax.pmap(method.hard_masks)(replicated)):
        leaf = np.asarray(leaf)
        assert leaf.shape[0] == N_DEVICES
        assert all(np.array_equal(leaf[0], leaf[i]) for i in range(1, N_DEVICES))
    assert_close(method, pmap.get_state(replicated), single_device_run(name))


@pytest.mark.parametrize("name", AVAILABLE)
def test_sharded_jit_equals_single_device_and_masks_identical_per_device(name):
    method = build(name)
    loss = stateless_loss(mlp_loss)
    sharded = ShardedTrainer(method, loss, make_mesh())
    state = run(sharded, method, steps=6)
    for leaf in jax.tree_util.tree_leaves(jax.jit(method.hard_masks)(state)):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        assert len(shards) == N_DEVICES
        assert all(np.array_equal(shards[0], s) for s in shards[1:])
    assert_close(method, state, single_device_run(name))


def test_model_axis_sharding_splits_large_kernels_consistently():
    method = sparsejax.static(optax.sgd(0.1, momentum=0.9), sparsity=0.5)
    loss = stateless_loss(mlp_loss)
    trainer = ShardedTrainer(method, loss, make_mesh(num_model=2), shard_model_axis=True,
                             min_shard_size=0)
    state = run(trainer, method, steps=3)
    split = jax.sharding.PartitionSpec(None, "model")
    # the kernel, its mask and its momentum slot are split the same way
    assert state.params["fc1"]["kernel"].sharding.spec == split
    assert state.masks["fc1"]["kernel"].sharding.spec == split
    assert state.params["fc1"]["bias"].sharding.spec == jax.sharding.PartitionSpec()
    assert_close(method, state, run(SingleDeviceTrainer(method, loss), method, steps=3))


@pytest.mark.parametrize("direction", ["8_to_1", "1_to_8"])
def test_checkpoint_moves_between_device_counts(tmp_path, direction):
    name = "rigl" if "rigl" in sparsejax.METHODS else "static"
    method = build(name)
    loss = stateless_loss(mlp_loss)
    many = ShardedTrainer(method, loss, make_mesh())
    one = SingleDeviceTrainer(method, loss)
    first, second = (many, one) if direction == "8_to_1" else (one, many)

    state = run(first, method, steps=3)
    Checkpointer(tmp_path).save(3, first.get_state(state), {})
    template = second.put_state(method.init(params(), jax.random.PRNGKey(1)))
    _, restored, _ = Checkpointer(tmp_path).restore(template)

    continued = run(second, method, steps=3, state=restored, first_batch=3)
    assert_close(method, continued, single_device_run(name))
    # The restored state lives where the new run's template asked for it.
    leaf = jax.tree_util.tree_leaves(restored.params)[0]
    assert len(leaf.sharding.device_set) == (1 if direction == "8_to_1" else N_DEVICES)


def test_pmap_checkpoint_saves_one_replica_and_resumes_on_one_device(tmp_path):
    method = build("static")
    loss = stateless_loss(mlp_loss)
    pmap = PmapTrainer(method, loss)
    state = run(pmap, method, steps=3)
    Checkpointer(tmp_path).save(3, pmap.get_state(state), {})
    _, restored, _ = Checkpointer(tmp_path).restore(method.init(params(), jax.random.PRNGKey(1)))
    continued = run(SingleDeviceTrainer(method, loss), method, steps=3, state=restored,
                    first_batch=3)
    assert_close(method, continued, single_device_run("static"))


def test_uneven_batch_and_unknown_mode_are_errors():
    with pytest.raises(ValueError, match="does not split evenly over 8"):
        split_batch({"x": np.zeros((12, 3))}, 8)
    with pytest.raises(ValueError, match="unknown parallel mode 'mpi'"):
        make_trainer("mpi", build("dense"), stateless_loss(mlp_loss))
