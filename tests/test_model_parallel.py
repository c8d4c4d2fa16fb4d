"""Model parallelism for large layers: a GPT whose attention and MLP kernels (and their
masks, scores and optimizer slots) are split along a ``model`` mesh axis, trained with
RigL and with Edge-Popup on 4 (data) x 2 (model) simulated CPU devices. The masks must be
identical to the unsharded run's on the same batches."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

import sparsejax
from sparsejax.engine.parallel import ShardedTrainer, SingleDeviceTrainer, make_mesh
from sparsejax.harness.models import get_model, init_model
from sparsejax.harness.training.loop import classification_loss

pytestmark = [pytest.mark.multidevice,
              pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")]

VOCAB, CONTEXT, BATCH, STEPS = 16, 8, 8, 3
METHODS = {
    "rigl": {"sparsity": 0.75, "update_every": 1, "end_step": STEPS, "total_steps": STEPS},
    "edge_popup": {"sparsity": 0.5},
}
SPLIT = PartitionSpec(None, "model")  # a kernel's output axis over the model devices


@pytest.fixture(scope="module")
def gpt():
    model = get_model("gpt", VOCAB, n_layer=1, n_embd=16, n_head=2, context=CONTEXT)
    params, model_state = init_model(model, jax.random.key(0), (1, CONTEXT))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (STEPS, BATCH, CONTEXT + 1))
    batches = [{"image": t[:, :-1], "label": t[:, 1:]} for t in tokens]
    return model, params, model_state, batches


def train(trainer, method, gpt):
    model, params, model_state, batches = gpt
    state = trainer.put_state(method.init(params, jax.random.key(1),
                                          model_state=model_state))
    for batch in batches:
        state, _ = trainer.step(state, trainer.put_batch(batch))
    return state


@pytest.mark.parametrize("name", list(METHODS))
def test_model_axis_gpt_masks_equal_unsharded(name, gpt):
    method = sparsejax.get_method(name, optax.sgd(0.1, momentum=0.9), **METHODS[name])
    loss = classification_loss(gpt[0])
    mesh = make_mesh(num_model=2)
    sharded = train(ShardedTrainer(method, loss, mesh, shard_model_axis=True,
                                   min_shard_size=0), method, gpt)
    block = sharded.params["block1"]
    for kernel in (block["attn"]["query"]["kernel"], block["attn"]["out"]["kernel"],
                   block["fc1"]["kernel"], block["fc2"]["kernel"]):
        assert kernel.sharding.spec == SPLIT
        assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
    fc1_mask = sharded.masks["block1"]["fc1"]["kernel"]
    assert fc1_mask.sharding.spec == SPLIT  # the mask goes with its kernel
    if name == "edge_popup":
        assert sharded.scores["block1/fc1/kernel"].sharding.spec == SPLIT

    single = train(SingleDeviceTrainer(method, loss), method, gpt)
    assert int(sharded.step) == int(single.step) == STEPS
    got = jax.tree_util.tree_leaves_with_path(jax.jit(method.hard_masks)(sharded))
    want = jax.tree_util.tree_leaves(method.hard_masks(single))
    moved = False
    for (path, a), b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    start = method.init(gpt[1], jax.random.key(1), model_state=gpt[2])
    for a, b in zip(want, jax.tree_util.tree_leaves(method.hard_masks(start)), strict=True):
        moved |= not np.array_equal(np.asarray(a), np.asarray(b))
    assert moved, "the masks never moved: the comparison would be empty"
