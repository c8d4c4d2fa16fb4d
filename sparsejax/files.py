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

__all__ = ["TMP_SUFFIX", "tmp_path", "write_atomic", "write_json", "write_failure"]

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
