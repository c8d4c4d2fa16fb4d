"""What a training run writes as it goes: ``metrics.jsonl`` (append-only JSON lines that
a resume can always continue), TensorBoard events, and the progress bar.

``metrics.jsonl`` is made resumable from both ends:

* Writing: each record is one ``write`` of one whole line to a file opened for
  appending, unbuffered, so nothing is held back in a buffer to be flushed (or lost)
  later; a write that fails (a full disk) cuts the file back to where the record began
  and raises an ``OSError`` naming the file, so a failed write leaves no half line.
* Reading on resume (:func:`repair_metrics`): a process killed mid-write, or a disk
  that lost the end of the file, can still leave a torn last line (no newline) or
  garbage (NUL bytes, a partial record) at the end. Every line is parsed; the file is
  cut back to its last good line before the first bad one, with a warning that names the
  file and what was dropped, and the records after the checkpoint are dropped as before
  (the resumed run writes them again). A bad line with good records *up to the
  checkpoint* after it is refused instead, naming the file and the line: no crash of
  this writer produces it (only the last line can be torn), and cutting there would
  destroy history that the resumed run cannot write again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax

from sparsejax.harness._extras import require
from sparsejax.harness.provenance import provenance
from sparsejax.io.files import write_atomic, write_failure

__all__ = ["MetricsLog", "NoLog", "ProgressBar", "repair_metrics", "tensorboard_writer",
           "LogRepair", "result_record"]

logger = logging.getLogger(__name__)


class _Line(NamedTuple):
    number: int  # 1-based
    start: int  # byte offsets in the file
    end: int  # just past the newline (or the end of a torn line)
    step: int | None  # the record's step; None for a bad line
    problem: str | None  # why the line is bad; None for a good or blank line


def _parse(data: bytes) -> list[_Line]:
    """Every line of ``data``, each a good record, a blank line or a bad line."""
    lines, start = [], 0
    while start < len(data):
        newline = data.find(b"\n", start)
        end = len(data) if newline < 0 else newline + 1
        text = data[start:end]
        step, problem = None, None
        if newline < 0:
            problem = "is cut short (no newline: a write ended by a crash or a full disk)"
        elif text.strip():
            try:
                record = json.loads(text)
            except ValueError as error:  # also a UnicodeDecodeError
                problem = f"is not a JSON record ({error})"
            else:
                value = record.get("step") if isinstance(record, dict) else None
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    step = value
                else:
                    problem = "is not a metrics record (a JSON object with an integer 'step')"
        lines.append(_Line(len(lines) + 1, start, end, step, problem))
        start = end
    return lines


class LogRepair(NamedTuple):
    """What :func:`repair_metrics` did to a file."""

    kept_lines: int
    kept_bytes: int
    bad_lines: int  # lines that were not records (a torn last line among them)
    dropped_lines: int  # every line dropped: bad ones and records after the checkpoint
    dropped_bytes: int


def repair_metrics(path: Path, keep_through: int) -> LogRepair | None:
    """Keep the records of ``path`` up to step ``keep_through`` (a resume's checkpoint)
    and cut away everything after them, including a torn or garbage end, with a warning
    when a bad line is dropped; ``None`` when there is no file.

    Raises ``ValueError`` naming the file and line when a bad line has records up to
    ``keep_through`` after it (see the module docstring); the file is then unchanged.
    """
    if not path.exists():
        return None
    data = path.read_bytes()
    lines = _parse(data)
    first_bad = next((line for line in lines if line.problem is not None), None)
    if first_bad is not None:
        after = [line for line in lines[first_bad.number:]
                 if line.step is not None and line.step <= keep_through]
        if after:
            raise ValueError(
                f"{path}: line {first_bad.number} {first_bad.problem}, yet line "
                f"{after[0].number} after it is a good record of step {after[0].step}, up to "
                f"the checkpoint (step {keep_through}); a crash only ever cuts the last line "
                f"short, so something else wrote into this file. Nothing was changed: delete "
                f"line {first_bad.number} (or move the file away) and resume again")
    good = lines if first_bad is None else lines[:first_bad.number - 1]
    kept = [line for line in good if line.step is None or line.step <= keep_through]
    while kept and kept[-1].step is None:  # no blank lines at the end
        kept.pop()
    content = b"".join(data[line.start:line.end] for line in kept)
    if content != data:
        if data.startswith(content):
            os.truncate(path, len(content))  # needs no free space, unlike a rewrite
        else:  # records out of order (a file edited by hand): rewrite the kept ones
            write_atomic(path, content)
    repair = LogRepair(len(kept), len(content), sum(line.problem is not None for line in lines),
                       len(lines) - len(kept), len(data) - len(content))
    if first_bad is not None:
        logger.warning(
            "%s: line %d %s; cut the file back to the last good line before it: %d line(s), "
            "%d bytes dropped (%d of them not records), %d line(s) kept; the run resumes from "
            "its checkpoint (step %d) and writes the metrics after it again",
            path, first_bad.number, first_bad.problem, repair.dropped_lines,
            repair.dropped_bytes, repair.bad_lines, repair.kept_lines, keep_through)
    return repair


class MetricsLog:
    """``metrics.jsonl``, append-only JSON lines (see the module docstring); on resume the
    file is repaired and cut back to the records up to ``resume_step``. Also writes
    TensorBoard events beside it when ``tensorboard`` and tensorboardX is installed."""

    def __init__(self, path: Path, resume_step: int, tensorboard: bool = True) -> None:
        self.path = path
        repair_metrics(path, resume_step)
        self._fd, self._size = -1, 0  # opened at the first record: no empty file before it
        self.writer = tensorboard_writer(path.parent / "tensorboard") if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line; a failed write leaves the file as it was."""
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        view, written = memoryview(data), 0
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                self._size = os.fstat(self._fd).st_size
            while written < len(data):  # a short write (a filling disk) goes on
                written += os.write(self._fd, view[written:])
        except OSError as error:
            if self._fd >= 0:
                with contextlib.suppress(OSError):  # no half line for a resume to trip on
                    os.ftruncate(self._fd, self._size)
            raise write_failure(error, self.path) from error
        self._size += len(data)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Close the file and the TensorBoard writer (both, whatever fails)."""
        try:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)
        finally:
            if self.writer is not None:
                writer, self.writer = self.writer, None
                writer.close()


class NoLog:
    """The metrics log of a process that writes no files (not process 0)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(directory: Path) -> Any:
    """A TensorBoard event writer where ``tensorboardX`` (the ``tensorboard`` extra) is
    installed, else ``None``: ``TrainConfig.tensorboard`` is on by default, so a missing
    extra is not an error. A resumed run writes a new events file beside the old ones;
    TensorBoard's reader stops at a torn last record of an old one."""
    try:
        tensorboardx = require("tensorboardX")
    except ImportError:
        return None
    return tensorboardx.SummaryWriter(str(directory))


class ProgressBar:
    """A tqdm bar of steps showing steps/s, loss, accuracy and sparsity (or nothing).

    ``TrainConfig.progress`` is on by default, so without tqdm (the ``progress`` extra) the
    run goes on without a bar, after a warning that names the extra."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.bar = None
        if enabled:
            try:
                tqdm_auto = require("tqdm.auto")
            except ImportError as error:
                warnings.warn(f"no progress bar: {error}; or pass progress=False "
                              "(CLI: --no-progress)", stacklevel=3)
            else:
                self.bar = tqdm_auto.tqdm(total=total, initial=start, unit="step",
                                          dynamic_ncols=True, mininterval=1.0,
                                          file=sys.stderr)
        self.step = start

    def update(self, step: int, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.step)
        self.step = step
        shown = {"loss": record.get("loss"), "acc": record.get("accuracy"),
                 "test": record.get("test_accuracy"), "sparsity": record.get("sparsity")}
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()
                              if v is not None and not math.isnan(v)}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def result_record(config: Any, sources: dict[str, str], total_steps: int, start_step: int,
                  skipped: int, layouts: list[dict[str, Any]], last_eval: dict[str, float],
                  sparsity: float, started: float) -> dict[str, Any]:
    """``result.json`` of a finished run: its final evaluation, its length and layouts
    (``layouts[-1]`` is this stretch's, also given at the top level), its config and where
    each value came from, and its provenance."""
    layout = {k: v for k, v in layouts[-1].items() if k != "from_step"}
    return {
        "method": config.method,
        "model": config.model,
        "dataset": config.dataset,
        "sparsity": sparsity,
        "test_accuracy": last_eval["accuracy"],
        "test_loss": last_eval["loss"],
        **{k: v for k, v in last_eval.items() if k.startswith("validation_")},
        "steps": total_steps,
        "resumed_from_step": start_step,
        "skipped_nonfinite_steps": skipped,
        **layout,  # this stretch's; "layouts": every stretch's, from its first step
        "layouts": layouts,
        "wall_seconds": time.time() - started,
        "backend": jax.default_backend(),
        "config": dataclasses.asdict(config),
        "config_sources": sources,
        "provenance": provenance(),
    }
