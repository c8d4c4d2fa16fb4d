"""Shared by the tests of runs that stop early and resume (tests/test_stranded_runs.py,
tests/test_interrupts.py): a tiny CLI run, its child process with faults
(tests/slow_cli.py), and the comparison of a resumed run with an uninterrupted one."""

import json
import os
import subprocess
import sys
from pathlib import Path

SLOW_CLI = Path(__file__).parent / "slow_cli.py"

# LeNet-300-100 on MNIST-1D: a checkpoint every 2 steps, a metrics line every step;
# --recipe none keeps stderr to the lines under test
STEPS = 6


def run_args(out, *extra, steps=STEPS):
    return ["train", "--steps", str(steps), "--batch-size", "64", "--checkpoint-every", "2",
            "--log-every", "1", "--recipe", "none", "--no-progress", "--no-tensorboard",
            "--out", str(out), *extra]


def reference_run(tmp_path_factory):
    """An uninterrupted run of :func:`run_args` (for a module-scoped fixture)."""
    from sparsejax.harness.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(run_args(out)) == 0
    return out


# what may differ between a resumed run and an uninterrupted one: timings, and the record
# of the resume itself
_RESUME_KEYS = {"wall_seconds", "resumed_from_step", "layouts", "extended_from_steps"}


def comparable_result(out):
    result = json.loads((Path(out) / "result.json").read_text())
    for key in _RESUME_KEYS:
        result.pop(key, None)
    for key in ("resume", "overwrite", "out"):
        result["config"].pop(key)
    return result


def comparable_metrics(out):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"}
            for line in lines]


def assert_same_run(out, reference):
    """``out`` ended with the result.json and metrics.jsonl of ``reference`` (except
    timings), and holds no temporary file."""
    assert comparable_result(out) == comparable_result(reference)
    assert comparable_metrics(out) == comparable_metrics(reference)
    assert not list(Path(out).glob("*.tmp"))


class Patched:
    """A module (``os``) with some of its functions replaced, to monkeypatch into one
    module of sparsejax (``monkeypatch.setattr(run_output, "os", Patched(os, write=f))``)
    without changing them for the whole process."""

    def __init__(self, module, **functions):
        self._module, self._functions = module, functions

    def __getattr__(self, name):
        return self._functions.get(name) or getattr(self._module, name)


def start_child(argv, **env):
    """``python tests/slow_cli.py ARGV`` with ``env`` added (SPARSEJAX_TEST_...), and
    this process's MNIST-1D (tests/child_data.py)."""
    from child_data import child_env

    return subprocess.Popen([sys.executable, str(SLOW_CLI), *map(str, argv)],
                            env={**os.environ, **child_env(), **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
    """``(returncode, stdout, stderr)`` of a child started by :func:`start_child`."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err
