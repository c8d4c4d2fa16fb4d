"""How a training run ends early without being stranded: an interrupt (SIGINT, SIGTERM)
or a file it cannot write (a full disk) stops it at a safe point, everything it holds
open is closed (the checkpointer last, so a failed background save is reported), and
one line says which step is saved and how to continue.

* :func:`stop_on_signals` (installed by ``sparsejax train``) turns the first SIGINT or
  SIGTERM into a request that the loop takes between two steps (:meth:`Guard.check`), so
  an interrupt never lands inside XLA's compiler or an orbax write: a compilation under
  way finishes first. A second signal ends the process at once, as the operating system
  would (a killed run resumes: its checkpoints are committed atomically). In a run of
  several processes the processes could stop at different steps and leave the others
  waiting in a collective, so there each process ends at once on the first signal.
* :class:`Guard` closes what a stretch of a run opened, in reverse order, and turns an
  interrupt, an ``OSError`` or a ``CheckpointError`` into :class:`RunStopped`, which
  names the newest committed checkpoint after the checkpointer is closed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

__all__ = ["RunStopped", "Guard", "stop_on_signals", "stop_requested", "exit_on_signal"]

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
COORDINATOR_GRACE_S = 3.0
"""How long process 0 of several outlives the others on a signal (:func:`exit_on_signal`)."""
_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class RunStopped(Exception):
    """A run ended before its last step by an interrupt or a failed write; its
    checkpoints are intact and ``resume`` continues it from ``saved_step``.

    ``exit_code``: 128 + the signal number for an interrupt (130 for SIGINT, 143 for
    SIGTERM, as a shell reports a process the signal ended), 2 for an error.
    """

    def __init__(self, cause: str, *, step: int, total_steps: int, saved_step: int | None,
                 checkpoint_dir: Path | None, exit_code: int, error: bool,
                 advice: str = "") -> None:
        self.cause, self.step, self.total_steps = cause, step, total_steps
        self.saved_step, self.checkpoint_dir = saved_step, checkpoint_dir
        self.exit_code, self.error, self.advice = exit_code, error, advice
        super().__init__(self.describe("run train again with resume=True to continue"))

    def describe(self, how: str | None) -> str:
        """One line: what stopped the run, what is saved and ``how`` to continue (``resume
        with: sparsejax train ... --resume``; ``None``: no advice)."""
        if self.checkpoint_dir is None:
            kept = "this run writes no checkpoints, so nothing is saved to continue from"
        elif self.saved_step is None:
            kept = f"no checkpoint was saved yet in {self.checkpoint_dir}, so a resume starts over"
        else:
            kept = f"step {self.saved_step} is saved in {self.checkpoint_dir}"
        stopped = f"stopped the run after step {self.step} of {self.total_steps}"
        line = (f"error: {self.cause}; this {stopped}" if self.error
                else f"{self.cause} {stopped}")
        line += f"; {kept}"
        if how is not None and self.checkpoint_dir is not None:
            line += f"; {self.advice}{how}"
        return line


class _Interrupt(Exception):
    """A stop requested by signal ``args[0]`` (internal to :class:`Guard`)."""


class _State:
    """What the signal handler records (the process has one set of signal handlers)."""

    received: int | None = None
    installed = False
    exit_at_once = False


def _handle(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT or SIGTERM: ask the loop to stop; a second one ends the process
    at once (the operating system's default action)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    _State.received = signum
    if _State.exit_at_once:
        exit_on_signal(signum)


def exit_on_signal(signum: int) -> None:
    """End the process now, after one line: a run of several processes (whose processes
    cannot all stop at the same step) resumes from its last committed checkpoint."""
    sys.stdout.flush()
    print(f"sparsejax train: stopped by {signal_name(signum)}; the checkpoints "
          "already committed are kept: run the same command with --resume to continue",
          file=sys.stderr, flush=True)
    # Process 0 hosts jax.distributed's coordination service: leaving first would make
    # the others, which got the same Ctrl-C, abort with the service's fatal error before
    # their own line. It waits a moment for them (the launcher stops any that linger).
    import jax

    if jax.process_count() > 1 and jax.process_index() == 0:
        time.sleep(COORDINATOR_GRACE_S)
    os._exit(128 + signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, the first SIGINT or SIGTERM is a request to stop that
    :meth:`Guard.check` turns into :class:`RunStopped` between two steps (see the module
    docstring); the previous handlers come back on exit. Outside the main thread, where
    Python takes no signals, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _State.received, _State.installed, _State.exit_at_once = None, True, False
    for sig in SIGNALS:
        signal.signal(sig, _handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _State.received, _State.installed, _State.exit_at_once = None, False, False


def stop_requested() -> int | None:
    """The signal that asked the run to stop, or ``None``."""
    return _State.received


class Guard:
    """One stretch of a run: the steps it has done, what it opened (closed in reverse
    order of :meth:`add`), and how it stops.

    ``checkpoint_dir`` and ``newest_checkpoint`` (the newest committed step, or ``None``)
    say what a stop keeps; ``checkpoint_dir`` is ``None`` for a run without checkpoints.
    """

    def __init__(self, *, step: int, total_steps: int, checkpoint_dir: Path | None,
                 newest_checkpoint: Callable[[], int | None], several_processes: bool) -> None:
        self.step, self.total_steps = step, total_steps
        self._checkpoint_dir, self._newest = checkpoint_dir, newest_checkpoint
        self._closers: list[Callable[[], None]] = []
        if several_processes and _State.installed:
            _State.exit_at_once = True
            if _State.received is not None:
                exit_on_signal(_State.received)

    def add(self, close: Callable[[], None]) -> None:
        """Close with ``close`` when the stretch ends (the last added closes first)."""
        self._closers.append(close)

    def check(self) -> None:
        """Raise :class:`RunStopped` (after closing) if a stop was requested by a signal."""
        signum = _State.received
        if signum is not None:
            raise self.stopped(_Interrupt(signum))

    def _close_all(self) -> list[Exception]:
        errors = []
        while self._closers:
            try:
                self._closers.pop()()
            except Exception as error:  # every closer runs; the errors are reported
                errors.append(error)
        return errors

    def close(self) -> None:
        """Close everything; a failure (a background checkpoint save) stops the run."""
        errors = self._close_all()
        if errors:
            raise self._stopped(errors[0], errors[1:])

    def close_quietly(self) -> None:
        """Close everything while another error is on its way out: a failure to close is
        logged, so it is not lost behind that error."""
        for error in self._close_all():
            logger.warning("while stopping: %s", _say(error))

    def stopped(self, error: BaseException) -> RunStopped:
        """Close everything, then the :class:`RunStopped` of ``error``: an interrupt (a
        stop that :meth:`check` found), an ``OSError`` or a
        ``CheckpointError``."""
        return self._stopped(error, self._close_all())

    def _stopped(self, error: BaseException, also: list[Exception]) -> RunStopped:
        saved = None
        if self._checkpoint_dir is not None:
            try:
                saved = self._newest()
            except Exception as e:  # reported, never hiding the stop itself
                also = [*also, e]
        later = "".join(f" ({'and ' if i else ''}{_say(e)})" for i, e in enumerate(also))
        interrupt = isinstance(error, _Interrupt)
        if interrupt:
            signum = error.args[0]
            cause = f"{signal_name(signum)}{later}"
            code, advice = 128 + signum, ""
        else:
            cause, code = f"{_say(error)}{later}", 2
            no_space = any(_no_space(e) for e in (error, *also))
            advice = "free space on that disk, then " if no_space else "once it can be written, "
        stop = RunStopped(cause, step=self.step, total_steps=self.total_steps,
                          saved_step=saved, checkpoint_dir=self._checkpoint_dir,
                          exit_code=code, error=not interrupt, advice=advice)
        stop.__cause__ = None if interrupt else error
        return stop


def _no_space(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is a full disk or quota."""
    for _ in range(8):  # the chain of causes, not unbounded
        if error is None:
            return False
        if getattr(error, "errno", None) in _NO_SPACE or any(
                text in str(error) for text in ("No space left", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _say(error: BaseException) -> str:
    """An error in a few words: ``cannot write runs/x/metrics.jsonl ([Errno 28] No space
    left on device)`` for an ``OSError`` naming a file, else its message."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"cannot write {error.filename} ([Errno {error.errno}] {error.strerror})"
    return str(error) or type(error).__name__


def signal_name(signum: int) -> str:
    """``SIGINT (Ctrl-C)`` or ``SIGTERM``."""
    return _NAMES.get(signum, f"signal {signum}")
