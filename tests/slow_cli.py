"""``python tests/slow_cli.py ARGS``: the ``sparsejax`` command line, with faults for the
interrupt and kill tests (tests/test_interrupts.py, tests/test_stranded_runs.py) set
through the environment:

* ``SPARSEJAX_TEST_BATCH_DELAY=S``: each training batch waits ``S`` seconds, so a test can
  send a signal while the run is between its first metrics line and its end.
* ``SPARSEJAX_TEST_KILL=FILE:N:PHASE``: SIGKILL this process at the ``N``-th write (from 1)
  of ``FILE`` (``metrics.jsonl``, ``config.json`` or ``result.json``): ``PHASE`` ``before``
  the write, ``torn`` after half its bytes, or ``after`` it (for ``result.json`` and
  ``config.json``: once the temporary file is written, before it replaces the old one).

MNIST-1D comes as the test process generated it (``SPARSEJAX_CACHE_DIR``,
tests/child_data.py).
"""

import os
import signal
import sys
import time
from pathlib import Path

from stop_checks import Patched

import sparsejax.harness.training.loop as loop
import sparsejax.harness.training.run_output as run_output
import sparsejax.io.files as files
from sparsejax.harness.cli import main


def _delay_batches(seconds: float) -> None:
    original = loop.train_batches

    def delayed(*args, **kwargs):
        for item in original(*args, **kwargs):
            time.sleep(seconds)
            yield item

    loop.train_batches = delayed


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(name: str, count: int, phase: str) -> None:
    seen = {"writes": 0}

    def due(path: object) -> bool:
        if Path(str(path)).name != name:
            return False
        seen["writes"] += 1
        return seen["writes"] == count

    real_write = os.write

    def write(fd: int, data: bytes) -> int:  # metrics.jsonl: one os.write per record
        if due(os.readlink(f"/proc/self/fd/{fd}")):
            if phase == "torn":
                real_write(fd, bytes(data)[: len(data) // 2])
            if phase in ("before", "torn"):
                _kill()
            written = real_write(fd, data)
            _kill()
            return written
        return real_write(fd, data)

    real_replace = os.replace

    def replace(src: object, dst: object) -> None:  # result.json, config.json
        if due(dst):
            if phase == "torn":
                with open(src, "r+b") as handle:
                    handle.truncate(os.path.getsize(src) // 2)
            if phase in ("torn", "after"):
                _kill()  # the .tmp is written (or half of it), the old file is untouched
            if phase == "before":
                os.unlink(src)
                _kill()
        real_replace(src, dst)

    run_output.os = Patched(os, write=write)
    files.os = Patched(os, replace=replace)


if __name__ == "__main__":
    if os.environ.get("SPARSEJAX_TEST_BATCH_DELAY"):
        _delay_batches(float(os.environ["SPARSEJAX_TEST_BATCH_DELAY"]))
    if os.environ.get("SPARSEJAX_TEST_KILL"):
        file, count, phase = os.environ["SPARSEJAX_TEST_KILL"].split(":")
        _kill_at(file, int(count), phase)
    sys.exit(main(sys.argv[1:]))
