"""Several processes for real: two processes of four simulated CPU devices each, started by
``sparsejax launch``, form one 8-device JAX job (``jax.distributed``, gloo collectives).

One pair of processes (tests/multiprocess_worker.py) trains RigL, SET, Edge-Popup and
the gates on the sharded trainer, and RigL on pmap, each process feeding its own rows
of every global batch. Its masks must be identical in both processes and equal, bit for
bit, to a one-process run on 8 devices with the same global batches; params and scores
agree to float rounding (the cross-process all-reduce adds the devices' partial gradients
in another order than the in-process one, so their last bits may differ). The same pair
then runs ``train`` (the loop behind ``sparsejax train --parallel sharded``) for 4 steps
and resumes it to 6: process 0 alone writes config, metrics and result, both write the
checkpoints, and the run matches a one-process run of 6 steps. Last, process 1 is
SIGKILLed right after starting its part of an async save (before the commit): the
checkpoint before it stays good, and this one process (8 devices) resumes the 2-process
run from it to the same result.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import multiprocess_worker as worker
import numpy as np
import pytest
from child_data import child_env

from sparsejax.harness.launch import launch
from sparsejax.harness.training.loop import train

pytestmark = pytest.mark.multiprocess

TESTS = Path(__file__).parent
RUNS = [("sharded", name) for name in worker.METHOD_OPTIONS] + [("pmap", "rigl")]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The files of the 2-process run and the one-process reference of every run (the
    reference computed here while the pair runs)."""
    if jax.device_count() != 8:
        pytest.skip("the one-process reference needs 8 simulated devices (conftest.py)")
    out = tmp_path_factory.mktemp("multiprocess")
    args = [*(f"{mode}:{name}" for mode, name in RUNS), "train:sharded", "killed:sharded"]
    pair = subprocess.Popen(
        [sys.executable, "-m", "sparsejax.harness.cli", "launch", "-n", "2",
         "--devices-per-process", "4", "--grace", "1", "--", sys.executable,
         str(TESTS / "multiprocess_worker.py"), str(out), *args],
        env={**os.environ, **child_env()},  # this process's MNIST-1D (tests/child_data.py)
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reference = {run: worker.run_method(run[1], run[0]) for run in RUNS}
        reference["train"] = train(worker.train_config("sharded", out / "reference", 6))
        output, _ = pair.communicate(timeout=300)
    finally:
        if pair.poll() is None:
            pair.terminate()  # the launcher stops its processes, then exits
            try:
                pair.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pair.kill()
    # process 1 died by SIGKILL (the last run), and the launcher passed its signal on
    assert pair.returncode == 128 + 9, output
    assert "[1] process 1: SIGKILL during the save of step 4" in output
    return out, reference, output


def test_both_processes_ran_on_the_global_mesh(two_processes):
    _, _, output = two_processes
    assert "[0] process 0 of 2: 4 of 8 devices, done" in output
    assert "[1] process 1 of 2: 4 of 8 devices, done" in output


@pytest.mark.parametrize("mode,name", RUNS)
def test_masks_identical_across_processes_and_equal_one_process(two_processes, mode, name):
    out, reference, _ = two_processes
    p0, p1 = (dict(np.load(out / f"{mode}_{name}_p{i}.npz")) for i in range(2))
    ref = reference[(mode, name)]
    assert p0.keys() == p1.keys() == ref.keys()
    masks = [key for key in ref if key.startswith("['masks']")]
    assert len(masks) == 4  # every leaf has a mask (all True where not pruned)
    for key in ref:  # every array bit for bit the same in both processes
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    for key in [*masks, "['step']"]:  # the masks and step bit for bit the one-process ones
        np.testing.assert_array_equal(p0[key], ref[key], err_msg=key)
    assert int(p0["['step']"]) == worker.STEPS
    for key in ref:
        np.testing.assert_allclose(p0[key], ref[key], rtol=1e-6, atol=1e-7, err_msg=key)
    if name in ("rigl", "set"):  # the masks moved (at steps 2 and 4) and kept their count
        first = np.asarray(worker.build(name).init(
            worker.params(), jax.random.PRNGKey(1)).masks["fc1"]["kernel"])
        moved = p0["['masks']['fc1']['kernel']"]
        assert not np.array_equal(moved, first) and moved.sum() == first.sum()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_launcher_stops_the_others_when_one_fails(tmp_path, capsys):
    """Process 1 exits with status 3 at once; process 0 would sleep a minute: the launcher
    stops it and exits with 3, its output prefixed."""
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, time\n"
        "i = int(os.environ['JAX_PROCESS_ID'])\n"
        "print('hello from', i, os.environ['JAX_NUM_PROCESSES'],"
        " os.environ['JAX_COORDINATOR_ADDRESS'].split(':')[0], flush=True)\n"
        "if i == 1:\n"
        "    sys.exit(3)\n"
        "time.sleep(60)\n")
    pids = []
    started = time.monotonic()
    code = launch(2, [sys.executable, str(script)], grace=2.0,
                  on_start=lambda processes: pids.extend(p.pid for p in processes))
    assert code == 3
    assert time.monotonic() - started < 30
    assert not any(_pid_alive(pid) for pid in pids)
    output = capsys.readouterr().out
    assert "[1] hello from 1 2 localhost" in output
    assert "a process exited with status 3" in output


def test_launcher_returns_zero_when_all_succeed_and_rejects_bad_input(tmp_path):
    assert launch(2, [sys.executable, "-c", "pass"]) == 0
    with pytest.raises(ValueError, match="-n must be a positive"):
        launch(0, [sys.executable, "-c", "pass"])
    with pytest.raises(ValueError, match="nothing to launch"):
        launch(2, [])
    with pytest.raises(ValueError, match="--grace must be a number of seconds >= 0"):
        launch(2, [sys.executable, "-c", "pass"], grace=-1)


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_train_across_processes_resumes_and_matches_one_process(two_processes):
    out, reference, output = two_processes
    run = out / "train_sharded"
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "checkpoints", "config.json", "metrics.jsonl", "result.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000006"]
    assert "[0] resumed from step 4" in output and "[1] resumed from step 4" in output
    result = json.loads((run / "result.json").read_text())
    expected = reference["train"]
    assert (result["processes"], result["devices"], expected["processes"]) == (2, 8, 1)
    assert (result["steps"], result["resumed_from_step"], result["extended_from_steps"]) == (
        6, 4, 4)
    assert [layout["from_step"] for layout in result["layouts"]] == [0, 4]
    assert {layout["processes"] for layout in result["layouts"]} == {2}
    assert result["sparsity"] == expected["sparsity"]
    assert result["test_accuracy"] == expected["test_accuracy"]
    np.testing.assert_allclose(result["test_loss"], expected["test_loss"], rtol=1e-5)
    lines, reference_lines = _metrics(run), _metrics(out / "reference")
    assert [m["step"] for m in lines] == [m["step"] for m in reference_lines] == [2, 4, 6]
    for got, want in zip(lines, reference_lines, strict=True):
        assert got["test_accuracy"] == want["test_accuracy"]
        for key in ("loss", "accuracy", "sparsity", "test_loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def test_a_process_killed_during_a_save_leaves_a_run_one_process_resumes(two_processes):
    out, reference, _ = two_processes
    config = worker.killed_config("sharded", out)
    checkpoints = Path(config.out) / "checkpoints"
    committed = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")
                       and p.name[5:].isdigit())
    assert committed == ["step_00000002"]  # the step-4 save never committed
    config.resume = True
    result = train(config)  # this one process, 8 devices
    expected = reference["train"]
    assert (result["processes"], result["devices"]) == (1, 8)
    assert (result["steps"], result["resumed_from_step"]) == (6, 2)
    assert result["layouts"] == [  # a resumed run says where each stretch of it ran
        {"from_step": 0, "parallel": "sharded", "processes": 2, "devices": 8},
        {"from_step": 2, "parallel": "sharded", "processes": 1, "devices": 8}]
    assert result["sparsity"] == expected["sparsity"]
    assert result["test_accuracy"] == expected["test_accuracy"]
    np.testing.assert_allclose(result["test_loss"], expected["test_loss"], rtol=1e-5)


def test_pmap_resume_with_several_processes_is_a_clear_error(tmp_path, monkeypatch):
    """pmap's state is a replica per process, which no coordinated save takes: several
    pmap processes write no checkpoints, so --resume says so (process count faked)."""
    from sparsejax.harness.training.loop import TrainConfig

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="--resume with 2 processes and --parallel pmap: "
                                         "such runs write no checkpoints"):
        train(TrainConfig(steps=1, parallel="pmap", resume=True, out=str(tmp_path / "r")))


def test_several_processes_without_a_parallel_mode_is_a_clear_error(tmp_path, monkeypatch):
    from sparsejax.harness.training.loop import TrainConfig

    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES=2: several processes train one "
                                         "model only with --parallel sharded or"):
        train(TrainConfig(steps=1, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_launcher_stopped_by_sigterm_stops_its_processes(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import os, pathlib, time\n"
        f"pathlib.Path({str(tmp_path)!r}, os.environ['JAX_PROCESS_ID']).write_text("
        "str(os.getpid()))\n"
        "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-m", "sparsejax.harness.cli", "launch", "-n", "2",
                                 "--", sys.executable, str(script)])
    pid_files = [tmp_path / "0", tmp_path / "1"]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.1)
    launcher.terminate()
    assert launcher.wait(timeout=30) == 128 + 15
    assert not any(_pid_alive(int(f.read_text())) for f in pid_files)
