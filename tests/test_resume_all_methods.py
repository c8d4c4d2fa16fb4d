"""Every registered method resumes bitwise identically after a crash mid-run.

Two levels: every method's state goes through a checkpoint and continues bit for bit on
a small MLP (the trainer's compiled step, the loop's checkpointer), in the default run;
the whole loop (data position, RNG, metrics) crashes and resumes for RigL by default and
for every method with ``-m slow``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_mlp import batches, mlp_loss, mlp_params

import sparsejax
from sparsejax import stateless_loss
from sparsejax.engine.parallel import SingleDeviceTrainer
from sparsejax.harness.training import loop
from sparsejax.harness.training.loop import TrainConfig, prepare, train
from sparsejax.io.checkpoint import Checkpointer
from sparsejax.methods import InitContext, get_method

# Options that make each method do its real work within a 12-step run.
OPTIONS = {
    "dense": dict(),
    "static": dict(sparsity=0.8),
    "magnitude": dict(sparsity=0.8),
    "gradual_magnitude": dict(sparsity=0.8),
    "random_prune": dict(sparsity=0.8),
    "snip": dict(sparsity=0.8),
    "grasp": dict(sparsity=0.8),
    "synflow": dict(sparsity=0.8),
    "set": dict(sparsity=0.8, method_options={"update_every": 3}),
    "rigl": dict(sparsity=0.8, method_options={"update_every": 3}),
    "snfs": dict(sparsity=0.8, method_options={"update_every": 3}),
    "edge_popup": dict(sparsity=0.5),
    "biprop": dict(sparsity=0.5),
    "supermask_weights": dict(sparsity=0.5),
    "gates": dict(sparsity=0.8),
    "ste_magnitude": dict(sparsity=0.8),
    "ste_random": dict(sparsity=0.8, method_options={"update_every": 3}),
    "sr_ste": dict(sparsity=0.5, method_options={"pattern": "2:4"}),
}


def _mlp_apply(params, model_state, x):
    return jax.nn.relu(x @ params["Dense_0"]["kernel"]) @ params["Dense_1"]["kernel"]


# The same methods on the toy MLP, each moving its masks (or scores) in both halves of an
# 8-step run: DST updates and gradual pruning every 2 steps, the strong tickets every step.
STATE_OPTIONS = {
    **{name: {k: v for k, v in options.items() if k != "method_options"}
       for name, options in OPTIONS.items()},
    "gradual_magnitude": dict(sparsity=0.8, total_steps=8, frequency=2),
    "synflow": dict(sparsity=0.8, apply_fn=_mlp_apply, input_shape=(20,), iterations=4),
    "set": dict(sparsity=0.8, update_every=2),
    "rigl": dict(sparsity=0.8, update_every=2, total_steps=16),  # its drop fraction decays
    "snfs": dict(sparsity=0.8, update_every=2, total_steps=8),
    "ste_random": dict(sparsity=0.8, update_every=2),
    "sr_ste": dict(sparsity=0.5, pattern="2:4"),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_method_state_resumes_bitwise_through_a_checkpoint(tmp_path, name):
    method = get_method(name, optax.sgd(0.1, momentum=0.9), **STATE_OPTIONS[name])
    xs, ys = batches(8)
    context = InitContext(stateless_loss(mlp_loss), ((xs[0], ys[0]),))

    def fresh():
        return method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
                           context=context)

    trainer = SingleDeviceTrainer(method, stateless_loss(mlp_loss))  # one compiled step
    state = fresh()
    for i in range(8):
        state, _ = trainer.step(state, (xs[i], ys[i]))
    uninterrupted = jax.device_get(state)

    state = fresh()
    for i in range(4):
        state, _ = trainer.step(state, (xs[i], ys[i]))
    at_crash = jax.device_get(state)
    Checkpointer(tmp_path).save(4, state, {"epoch": 0, "batch": 4})
    del state  # the crash: only the checkpoint is left
    step, state, _ = Checkpointer(tmp_path).restore(fresh())
    assert step == 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state), at_crash)
    for i in range(4, 8):
        state, _ = trainer.step(state, (xs[i], ys[i]))
    assert int(state.step) == 8
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state),
                           uninterrupted)
    # the run did move its masks after the checkpoint (so the resume is tested on a live
    # decision, not a frozen one), except for the methods whose masks are fixed at init
    def masks(state):  # the gates' hard masks come from their parameters
        return method.hard_masks(state) if name == "gates" else state.masks

    moved = not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), masks(at_crash), masks(uninterrupted))))
    fixed_masks = {"dense", "static", "magnitude", "random_prune", "snip", "grasp", "synflow"}
    assert moved == (name not in fixed_masks), name


class _Crash(Exception):
    pass


def test_every_registered_method_is_covered():
    assert set(sparsejax.METHODS) <= set(OPTIONS)


# One method runs by default (RigL: dynamic masks, an update inside the run, its RNG);
# the rest, Edge-Popup's tracked top-k cuts among them, with `-m slow` (about 4 min).
DEFAULT_RUN = {"rigl"}


@pytest.mark.parametrize("name", [
    name if name in DEFAULT_RUN else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(OPTIONS)
])
def test_crash_and_resume_is_bitwise_identical(tmp_path, monkeypatch, name):
    if name not in sparsejax.METHODS:
        pytest.skip(f"{name} is not registered")
    # checkpoints at 6 (the crash) and 12 only; RigL's update at step 9 comes after the
    # resume, a live decision
    common = dict(method=name, steps=12, checkpoint_every=6, dataset="mnist1d",
                  batch_size=32, progress=False, log_every=3, tensorboard=False,
                  init_batches=1, **OPTIONS[name])
    reference = TrainConfig(**common, out=str(tmp_path / "reference"))
    train(reference)

    crashed = TrainConfig(**common, out=str(tmp_path / "crashed"))
    original_save = loop.Checkpointer.save

    def save_then_crash(self, step, state, metadata=None):
        original_save(self, step, state, metadata)
        if step == 6:
            raise _Crash

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_crash)
    with pytest.raises(_Crash):
        train(crashed)
    monkeypatch.setattr(loop.Checkpointer, "save", original_save)
    result = train(TrainConfig(**{**crashed.__dict__, "resume": True}))
    assert result["resumed_from_step"] == 6

    template = prepare(reference).state
    _, a, _ = Checkpointer(tmp_path / "reference" / "checkpoints").restore(template)
    _, b, _ = Checkpointer(tmp_path / "crashed" / "checkpoints").restore(template)
    assert int(a.step) == int(b.step) == 12
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
