"""Whole files written atomically: a reader (or a rerun) sees the old file or the new one,
never a 0-byte or half-written one, and a failed write leaves no temporary file behind.

Every result, config and ticket file sparsejax writes goes through :func:`write_atomic`:
the bytes go to ``NAME.tmp`` beside the target, are flushed to the disk, and the
temporary file is renamed over the target (``os.replace``, atomic on POSIX). A write that
fails (a full disk: ``OSError`` ``ENOSPC``; an interrupt) removes ``NAME.tmp`` and raises
an ``OSError`` that names the target. Only a process killed between writing and renaming
(SIGKILL, power loss) can leave a ``NAME.tmp``, which nothing reads and the next write of
the same file replaces.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TMP_SUFFIX", "tmp_path", "write_atomic", "write_json", "write_failure", "read_json",
           "check_run_result"]

TMP_SUFFIX = ".tmp"


def tmp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`write_atomic` writes ``path`` through (``NAME.tmp``)."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def write_failure(error: OSError, path: str | os.PathLike[str]) -> OSError:
    """``error`` as an ``OSError`` of the same kind whose message names ``path`` (the file
    the user knows, not a temporary one): ``[Errno 28] No space left on device: 'out/x'``."""
    strerror = error.strerror or str(error)
    try:
        return type(error)(error.errno, strerror, str(path))
    except TypeError:  # an OSError subclass with another signature
        return OSError(error.errno, strerror, str(path))


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (``str``: UTF-8) atomically; on failure remove the
    temporary file, leave ``path`` as it was and raise an ``OSError`` naming ``path``."""
    path = Path(path)
    tmp = tmp_path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as error:  # a full disk, or an interrupt: no .tmp left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_failure(error, path) from error
        raise


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """``payload`` as indented JSON with sorted keys, written by :func:`write_atomic`."""
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "JSON file",
              expect: type | None = dict) -> Any:
    """The JSON document in ``path``; every way it can be unreadable is a ``ValueError``
    (or, for a file that cannot be opened, an ``OSError``) whose one line names ``path``:
    ``RUN/result.json is not valid JSON (line 1 column 5: Expecting ...)``.

    ``what`` says what the file should be (``"a sparsejax result"``); ``expect`` is the
    type the document must have (a JSON object by default; ``None``: any).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise write_failure(error, path) from error
    if not data.strip():
        raise ValueError(f"{path} is empty, not {what} (a write cut short?)")
    try:
        document = json.loads(data)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text: {error.reason} at byte "
                         f"{error.start}); expected {what}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (line {error.lineno} column {error.colno}: "
                         f"{error.msg}); expected {what}") from None
    if expect is not None and not isinstance(document, expect):
        kind = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise ValueError(f"{path} is not {what}: not {kind}")
    return document


def check_run_result(run_dir: str | os.PathLike[str]) -> None:
    """Raise a one-line ``ValueError`` naming ``RUN_DIR/result.json`` when it is there but
    not the result of a finished ``sparsejax train`` run (broken JSON, no ``config``);
    commands that restore a run (``prune``, ``export-ticket``) call it first."""
    path = Path(run_dir) / "result.json"
    if path.exists():
        what = "the result of a finished sparsejax train run"
        result = read_json(path, what)
        if not isinstance(result.get("config"), dict):
            raise ValueError(f"{path} is not {what}: it holds no 'config'")
