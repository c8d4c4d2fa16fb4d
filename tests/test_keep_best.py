"""``TrainConfig.keep_best`` / ``sparsejax train --keep-best``: the run keeps its best
checkpoints by a held-out metric (and the newest, to resume from), never by the test set."""

import json

import pytest

from sparsejax.harness.training.loop import TrainConfig, train
from sparsejax.io.checkpoint import Checkpointer

FAST = dict(dataset="mnist1d", model="mlp", model_options={"hidden": [16]}, batch_size=32,
            progress=False, tensorboard=False, recipe="none")


def test_keeps_the_best_by_validation_loss_and_the_newest(tmp_path):
    out = tmp_path / "run"
    # lr 3: the validation loss rises after step 1, so the best is not the newest
    train(TrainConfig(method="dense", steps=6, lr=3.0, log_every=1, eval_every=100,
                      checkpoint_every=1, keep_checkpoints=1, keep_best="validation_loss",
                      validation_size=200, out=str(out), **FAST))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {m["step"]: m["validation_loss"] for m in lines if "validation_loss" in m}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]  # every saved step was evaluated
    best = min(losses, key=losses.get)
    kept = sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir()
                  if p.name.startswith("step_") and p.name[5:].isdigit())
    assert best != 6 and kept == [best, 6]
    with Checkpointer(out / "checkpoints", best_metric="validation_loss") as ckpt:
        assert ckpt.best_step() == best and ckpt.latest_step() == 6
    with pytest.raises(ValueError, match="best_step needs a Checkpointer made with"):
        Checkpointer(out / "checkpoints").best_step()


def test_keep_best_needs_a_validation_split(tmp_path):
    with pytest.raises(ValueError, match="--keep-best validation_loss needs a held-out split"):
        train(TrainConfig(steps=1, keep_best="validation_loss", out=str(tmp_path / "r"),
                          **FAST))
    with pytest.raises(ValueError, match="--keep-best must be validation_loss or"):
        train(TrainConfig(steps=1, keep_best="test_loss", validation_size=10,
                          out=str(tmp_path / "r"), **FAST))
    assert not (tmp_path / "r").exists()
