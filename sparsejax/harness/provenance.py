"""What a recorded result ran at: the commit, whether the tree was dirty, the versions.

Every ``result.json`` and experiments JSON stores :func:`provenance` under ``"provenance"``
so that a recorded number can be traced to the code that produced it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _git(*args: str) -> str | None:
    """``git -C <package dir> args`` stripped, or ``None`` if git fails or is missing."""
    package_dir = Path(__file__).resolve().parents[1]  # sparsejax/, above harness/
    try:
        done = subprocess.run(["git", "-C", str(package_dir), *args],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout holding this package, once per process.

    ``(None, None)`` when git is missing or the package is not tracked by a checkout
    (installed from a wheel, even into a virtual environment inside some checkout).
    ``dirty`` (tracked files changed, untracked ones ignored) is the state at the first
    call: edits made later in the same process are not seen.
    """
    if _git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = _git("rev-parse", "HEAD")
    if commit is None or len(commit) != 40:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _platform() -> dict[str, Any]:
    try:
        import jax

        return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                "device_count": jax.device_count()}
    except Exception:  # provenance never fails a run
        return {"backend": None, "device_kind": None, "device_count": None}


def provenance() -> dict[str, Any]:
    """The commit (40 hex digits, or ``None`` outside a git checkout), whether the tree was
    dirty at the first call in this process (``None`` when unknown), the package versions
    and the platform. Never raises.

    >>> sorted(provenance())
    ['commit', 'dirty', 'platform', 'sparsejax', 'versions']
    >>> sorted(provenance()["versions"])[:3]
    ['flax', 'jax', 'jaxlib']
    """
    commit, dirty = _git_state()
    versions: dict[str, str | None] = {name: _version(name) for name in _PACKAGES}
    versions["python"] = platform.python_version()
    return {"commit": commit, "dirty": dirty, "sparsejax": _version("sparsejax"),
            "versions": versions, "platform": _platform()}
