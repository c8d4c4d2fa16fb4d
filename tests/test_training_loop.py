"""The training harness: result files, exact resume after SIGKILL, checkpoint fallback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from child_data import child_env
from stop_checks import SLOW_CLI

from sparsejax.harness.cli import main
from sparsejax.harness.provenance import provenance
from sparsejax.harness.training.loop import TrainConfig, build_method, prepare, train
from sparsejax.io.checkpoint import Checkpointer

FAST = dict(dataset="mnist1d", model="lenet300", batch_size=64, progress=False, log_every=10)


def restore_final(config: TrainConfig):
    step, state, _ = Checkpointer(Path(config.out) / "checkpoints").restore(prepare(config).state)
    return step, state


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_writes_result_with_measured_sparsity(tmp_path):
    config = TrainConfig(method="static", sparsity=0.75, distribution="erk", steps=40,
                         out=str(tmp_path / "run"), **FAST)
    result = train(config)
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for key in ("method", "model", "dataset", "sparsity", "test_accuracy", "steps",
                "wall_seconds", "config"):
        assert key in result
    assert abs(result["sparsity"] - 0.75) < 1e-3  # measured on the effective model
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["steps"] == 40
    assert result["config"]["sparsity"] == 0.75
    assert result["provenance"] == provenance()  # the commit it ran at, and the versions
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [10, 20, 30, 40]


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    config = TrainConfig(method="dense", steps=5, out=str(tmp_path / "run"), **FAST)
    train(config)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)


def test_method_option_errors():
    optimizer = __import__("optax").sgd(0.1)
    with pytest.raises(ValueError, match="does not take --sparsity"):
        build_method(TrainConfig(method="dense", sparsity=0.5), optimizer)
    with pytest.raises(ValueError, match="needs --sparsity"):
        build_method(TrainConfig(method="static"), optimizer)
    with pytest.raises(ValueError, match="unknown method .rigl9.; known methods: .*dense"):
        build_method(TrainConfig(method="rigl9"), optimizer)
    with pytest.raises(ValueError, match="sparsity must lie in"):
        prepare(TrainConfig(method="static", sparsity=1.0, steps=1, **FAST))


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    # killed after its second checkpoint, with ten more to write (a second or more of work
    # left, so the kill lands mid-run even on a loaded machine)
    common = ["train", "--method", "static", "--sparsity", "0.8", "--steps", "120",
              "--batch-size", "64", "--checkpoint-every", "10", "--log-every", "10",
              "--no-progress", "--weight-decay", "5e-4"]
    killed = tmp_path / "killed"
    # the CLI (tests/slow_cli.py: its main, no faults) on this process's MNIST-1D
    proc = subprocess.Popen([sys.executable, str(SLOW_CLI), *common, "--out", str(killed)],
                            env={**os.environ, **child_env()},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000020").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "killed too late to test anything"

    assert main([*common, "--out", str(killed), "--resume"]) == 0
    reference = tmp_path / "reference"  # uninterrupted, one checkpoint at the end
    assert main([*common, "--checkpoint-every", "120", "--out", str(reference)]) == 0

    resumed_result = json.loads((killed / "result.json").read_text())
    assert resumed_result["resumed_from_step"] >= 20
    config = TrainConfig(method="static", sparsity=0.8, steps=120, batch_size=64,
                         weight_decay=5e-4)
    step_a, state_a = restore_final(TrainConfig(**{**config.__dict__, "out": str(killed)}))
    step_b, state_b = restore_final(TrainConfig(**{**config.__dict__, "out": str(reference)}))
    assert step_a == step_b == 120
    assert_bitwise_equal(state_a, state_b)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    out = tmp_path / "run"
    config = TrainConfig(method="dense", steps=30, checkpoint_every=10, out=str(out), **FAST)
    train(config)
    newest = out / "checkpoints" / "step_00000030"
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "MANIFEST.json"),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncate
    with caplog.at_level("WARNING", logger="sparsejax.io.checkpoint"):
        result = train(TrainConfig(**{**config.__dict__, "resume": True}))
    assert result["resumed_from_step"] == 20
    assert any("step_00000030" in r.getMessage() for r in caplog.records)
    assert (out / "checkpoints" / "step_00000020").exists()  # nothing earlier lost


def test_plot_command_writes_png(tmp_path):
    for sparsity in (0.5, 0.9):
        train(TrainConfig(method="static", sparsity=sparsity, steps=5,
                          out=str(tmp_path / f"s{sparsity}"), **FAST))
    png = tmp_path / "plot.png"
    assert main(["plot", str(tmp_path), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _nan_at(monkeypatch, bad_step):
    """Make the training stream's batch of ``bad_step`` (1-based) hold a NaN."""
    import sparsejax.harness.training.loop as loop

    original = loop.train_batches

    def corrupted(*args, **kwargs):
        for i, (position, batch) in enumerate(original(*args, **kwargs)):
            if i == bad_step - 1:  # the runs here start at step 0
                batch = {**batch, "image": batch["image"].copy()}
                batch["image"][0, 0] = np.nan
            yield position, batch

    monkeypatch.setattr(loop, "train_batches", corrupted)


def test_nan_in_a_batch_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    _nan_at(monkeypatch, bad_step=25)
    out = tmp_path / "run"
    config = TrainConfig(method="static", sparsity=0.5, steps=40, checkpoint_every=10,
                         out=str(out), **{**FAST, "log_every": 100})
    with pytest.raises(FloatingPointError, match="at step 25"):
        train(config)
    steps = Checkpointer(out / "checkpoints").all_steps()
    assert steps == [10, 20]  # nothing at or after the bad step was saved
    _, state, _ = Checkpointer(out / "checkpoints").restore(prepare(config).state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))


def test_nan_in_a_batch_is_skipped_and_counted_with_nonfinite_skip(tmp_path, monkeypatch):
    _nan_at(monkeypatch, bad_step=5)
    result = train(TrainConfig(method="static", sparsity=0.5, steps=12, nonfinite="skip",
                               out=str(tmp_path / "run"), **FAST))
    assert result["skipped_nonfinite_steps"] == 1
    assert np.isfinite(result["test_loss"])


@pytest.mark.parametrize("parallel", [
    "pmap", pytest.param("sharded", marks=pytest.mark.slow)])  # test_parallel covers sharded
def test_parallel_modes_through_the_loop_match_a_single_device(tmp_path, parallel):
    if jax.device_count() < 8:
        pytest.skip("needs simulated devices")
    common = dict(method="static", sparsity=0.5, steps=6, batch_size=64, progress=False)
    single = train(TrainConfig(**common, out=str(tmp_path / "one")))
    many = train(TrainConfig(**common, parallel=parallel, out=str(tmp_path / parallel)))
    assert many["devices"] == 8
    assert abs(many["test_accuracy"] - single["test_accuracy"]) < 1e-3
    _, a = restore_final(TrainConfig(**common, out=str(tmp_path / "one")))
    _, b = restore_final(TrainConfig(**common, out=str(tmp_path / parallel)))
    for x, y in zip(jax.tree_util.tree_leaves(a.masks), jax.tree_util.tree_leaves(b.masks),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_tensorboard_events_where_installed(tmp_path):
    pytest.importorskip("tensorboardX")
    train(TrainConfig(method="dense", steps=10, out=str(tmp_path / "run"), **FAST))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
