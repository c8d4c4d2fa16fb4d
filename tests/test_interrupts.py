"""SIGINT (Ctrl-C) and SIGTERM during ``sparsejax train`` (docs/reliability.md): the run
stops between two steps, also when the signal comes during XLA's compilation, with one
line naming the step saved and the command that resumes it (exit code 130 or 143, no
traceback), and that command ends with the result of an uninterrupted run."""

import re
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
from stop_checks import assert_same_run, finish, reference_run, run_args, start_child

import sparsejax.harness.cli as cli
import sparsejax.harness.training.loop as loop
from sparsejax.harness.cli import main, resume_command
from sparsejax.harness.training.stops import stop_on_signals, stop_requested

main_thread_only = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="Python takes signals in the main thread only")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def the_line(err):
    """The one line of stderr that says how the run ended (no traceback anywhere)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("sparsejax train:")]
    assert len(lines) == 1, err
    return lines[0]


def send_at(monkeypatch, batch, signum):
    """Send ``signum`` to this process while the run draws its ``batch``-th batch."""
    original = loop.train_batches

    def stream(*args, **kwargs):
        for i, item in enumerate(original(*args, **kwargs)):
            if i + 1 == batch:
                signal.raise_signal(signum)
            yield item

    monkeypatch.setattr(loop, "train_batches", stream)


@main_thread_only
@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "SIGINT (Ctrl-C)"),
                                                (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_stops_the_run_between_steps_and_its_command_resumes_it(
        reference, tmp_path, capsys, monkeypatch, signum, code, name):
    out = tmp_path / "run"
    before = signal.getsignal(signum)
    send_at(monkeypatch, 4, signum)  # step 4 runs (and is saved), step 5 does not
    assert main(run_args(out)) == code
    line = the_line(capsys.readouterr().err)
    assert f"{name} stopped the run after step 4 of 6; step 4 is saved in " in line
    command = line.split("; resume with: ")[1]
    assert command == shlex.join(["sparsejax", *run_args(out), "--resume"])
    assert signal.getsignal(signum) is before  # the CLI's handlers are gone again
    monkeypatch.undo()
    assert main(shlex.split(command)[1:]) == 0
    assert_same_run(out, reference)


@main_thread_only
def test_a_second_signal_is_left_to_the_operating_system():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals():
        assert stop_requested() is None
        signal.raise_signal(signal.SIGINT)
        assert stop_requested() == signal.SIGINT
        # the next one would end the process at once, as SIGKILL would
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert stop_requested() is None
    assert signal.getsignal(signal.SIGINT) is before


def test_the_resume_command_drops_overwrite_and_adds_resume_once():
    assert resume_command(["train", "--out", "runs/a b", "--overwrite"]) == (
        "sparsejax train --out 'runs/a b' --resume")
    assert resume_command(["train", "--overw", "--steps", "5"]) == (
        "sparsejax train --steps 5 --resume")
    assert resume_command(["train", "--resu"]) == "sparsejax train --resu"


def test_ctrl_c_outside_a_run_is_one_line(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)  # e.g. while jax is imported
    assert main(["train", "--steps", "1"]) == 130
    err = capsys.readouterr().err
    assert err == "sparsejax train: interrupted by SIGINT (Ctrl-C)\n"


def wait_for(path, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.stat().st_size:
        assert proc.poll() is None, finish(proc)
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_ctrl_c_after_the_first_metrics_line(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_child(run_args(out), SPARSEJAX_TEST_BATCH_DELAY="0.3")
    wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130, err
    line = the_line(err)
    assert err.strip() == line  # nothing else on stderr
    assert re.search(r"SIGINT \(Ctrl-C\) stopped the run after step [1-5] of 6; ", line), line
    command = line.split("; resume with: ")[1]
    assert main(shlex.split(command)[1:]) == 0
    assert_same_run(out, reference)


def test_ctrl_c_during_compilation(tmp_path):
    """The signal comes as the first step is compiled (an empty compilation cache): the
    compilation finishes, the run stops before its second step. It used to print a
    KeyboardInterrupt traceback, and then the process died of a segfault (exit 139)."""
    out = tmp_path / "run"
    proc = start_child(run_args(out), SPARSEJAX_TEST_BATCH_DELAY="0.3",
                       JAX_COMPILATION_CACHE_DIR=str(tmp_path / "empty-cache"))
    wait_for(out / "config.json", proc)  # written just before the step is built
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130, err
    line = the_line(err)
    assert re.search(r"stopped the run after step [01] of 6; no checkpoint was saved yet "
                     r"in .*, so a resume starts over; resume with: sparsejax train ", line)


def test_each_process_of_several_ends_at_once_on_a_signal():
    """The processes of a launch could stop at different steps and leave the others
    waiting in a collective: each ends at once, with one line (a killed run resumes)."""
    script = (
        "import signal\n"
        "from pathlib import Path\n"
        "from sparsejax.harness.training.stops import Guard, stop_on_signals\n"
        "with stop_on_signals():\n"
        "    Guard(step=3, total_steps=6, checkpoint_dir=Path('c'), several_processes=True,\n"
        "          newest_checkpoint=lambda: None)\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "    print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143 and proc.stdout == "", proc
    assert proc.stderr == ("sparsejax train: stopped by SIGTERM; the checkpoints already "
                           "committed are kept: run the same command with --resume to "
                           "continue\n")


@pytest.mark.slow
def test_ctrl_c_to_a_launch_process_group_ends_every_process_with_one_line(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: the launcher and each of its
    processes end with one line (it printed a traceback from every process), and the same
    launch with --resume finishes the run."""
    import json
    import os

    from stop_checks import SLOW_CLI

    out = tmp_path / "run"
    command = [sys.executable, "-m", "sparsejax.harness.cli", "launch", "-n", "2",
               "--devices-per-process", "1", "--", sys.executable, str(SLOW_CLI),
               *run_args(out, "--parallel", "sharded")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            env={**os.environ, "SPARSEJAX_TEST_BATCH_DELAY": "0.5"})
    wait_for(out / "metrics.jsonl", proc, timeout=300)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    for rank in (0, 1):
        lines = [line for line in stdout.splitlines()
                 if line.startswith(f"[{rank}] sparsejax train: stopped by SIGINT")]
        assert len(lines) == 1, stdout
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert json.loads((out / "result.json").read_text())["steps"] == 6
