"""Every registered method resumes bitwise identically after a crash mid-run."""

import jax
import numpy as np
import pytest

import sparsejax
from sparsejax.checkpoint import Checkpointer
from sparsejax.training import loop
from sparsejax.training.loop import TrainConfig, prepare, train

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
}


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
    common = dict(method=name, steps=12, checkpoint_every=3, dataset="mnist1d",
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
