"""``mnist1d``, generated locally by the ``mnist1d`` package from a seed (4000 train / 1000
test examples), once per seed in a process (:func:`generate_mnist1d`), and kept on disk
for the next process.

Importing ``mnist1d`` (it pulls in matplotlib) and generating its 5000 examples cost
0.8-2.1 s of every ``sparsejax train`` start on LeNet-300-100 (3.2-3.9 s to the first step
with both caches warm, against 4.6-5.9 s; docs/benchmarks.md). The arrays are written
once per seed and ``mnist1d`` version to :func:`cache_dir` (default
``$XDG_CACHE_HOME/sparsejax``, else ``~/.cache/sparsejax``; the environment variable
``SPARSEJAX_CACHE_DIR`` names another folder, or turns the cache off when empty), with
a SHA-256 digest of their bytes, and read back from there without importing the
package. A file that cannot be read, whose arrays do not fit together as mnist1d's, or
whose digest does not match, is generated and written again; a folder that cannot be
written only costs the time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import logging
import os
import random
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np

from sparsejax.harness._extras import require
from sparsejax.harness.data.dataset import NUM_CLASSES, Dataset
from sparsejax.io.files import write_atomic

__all__ = ["cache_dir", "generate_mnist1d"]

logger = logging.getLogger(__name__)

CACHE_ENV = "SPARSEJAX_CACHE_DIR"
_NAMES = ("x", "y", "x_test", "y_test")


def cache_dir() -> Path | None:
    """The folder that keeps generated datasets (``None``: no cache): ``$SPARSEJAX_CACHE_DIR``
    when set (empty: none), else ``$XDG_CACHE_HOME/sparsejax`` or ``~/.cache/sparsejax``.

    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"SPARSEJAX_CACHE_DIR": "/tmp/somewhere"}):
    ...     str(cache_dir())
    '/tmp/somewhere'
    >>> with mock.patch.dict(os.environ, {"SPARSEJAX_CACHE_DIR": ""}):
    ...     cache_dir() is None
    True
    """
    if CACHE_ENV in os.environ:
        folder = os.environ[CACHE_ENV]
        return Path(folder).expanduser() if folder else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsejax"


def generate_mnist1d(seed: int) -> Dataset:
    """The ``mnist1d`` dataset generated from ``seed`` (arrays read-only, kept per seed in
    the process and in :func:`cache_dir`)."""
    return _generated_mnist1d(seed)


@functools.lru_cache(maxsize=4)
def _generated_mnist1d(seed: int) -> Dataset:
    path = _cache_file(seed)
    arrays = _read(path) if path is not None else None
    if arrays is None:
        # mnist1d.data pulls in matplotlib and requests; import it only when needed (it
        # comes with the ``data`` extra).
        arrays = _generate(require("mnist1d.data"), seed)
        if path is not None:
            _write(path, arrays)
    for array in arrays:
        array.flags.writeable = False  # no caller can change what the next one gets
    return Dataset("mnist1d", *arrays, num_classes=NUM_CLASSES["mnist1d"])


def _generate(mnist1d_data: ModuleType, seed: int) -> list[np.ndarray]:
    args = mnist1d_data.get_dataset_args()
    args.seed = seed
    # make_dataset seeds and draws from the global `random` and `np.random` generators;
    # restore them so that loading data does not change the caller's random streams.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = mnist1d_data.make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return [generated["x"].astype(np.float32)[..., None], generated["y"].astype(np.int32),
            generated["x_test"].astype(np.float32)[..., None],
            generated["y_test"].astype(np.int32)]


def _cache_file(seed: int) -> Path | None:
    """Where ``seed``'s arrays are kept: one file per seed and ``mnist1d`` version (whose
    default arguments define the dataset); ``None`` without a cache or the package."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        return None  # generating raises the error that names the extra
    return folder / f"mnist1d-{version}-seed{int(seed)}.npz"


def _digest(arrays: list[np.ndarray]) -> str:
    """SHA-256 of the arrays' types, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _fit(arrays: list[np.ndarray]) -> bool:
    """Whether ``(x, y, x_test, y_test)`` fit together as mnist1d's arrays do: float32
    signals ``(n, length, 1)``, int32 labels ``(n,)`` in ``[0, 10)``."""
    x, y, x_test, y_test = arrays
    return (x.dtype == x_test.dtype == np.float32 and y.dtype == y_test.dtype == np.int32
            and x.ndim == x_test.ndim == 3 and x.shape[2:] == x_test.shape[2:] == (1,)
            and x.shape[1] == x_test.shape[1] and y.shape == x.shape[:1]
            and y_test.shape == x_test.shape[:1]
            and all(((labels >= 0) & (labels < NUM_CLASSES["mnist1d"])).all()
                    for labels in (y, y_test)))


def _read(path: Path) -> list[np.ndarray] | None:
    """The arrays kept in ``path``, or ``None`` if it is missing, unreadable, not
    mnist1d's four arrays, or not what its digest says."""
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = [file[name] for name in _NAMES]
            digest = str(file["sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logger.warning("mnist1d: the cached %s is unreadable (%s); generating it again",
                       path, error)
        return None
    if not _fit(arrays) or digest != _digest(arrays):
        logger.warning("mnist1d: the cached %s does not hold what it should (arrays %s, "
                       "digest %s); generating it again", path,
                       [(a.dtype.str, a.shape) for a in arrays], digest[:12])
        return None
    return arrays


def _write(path: Path, arrays: list[np.ndarray]) -> None:
    """Keep ``arrays`` in ``path``, written whole or not at all (:func:`write_atomic`); a
    folder that cannot be written is skipped."""
    buffer = io.BytesIO()
    np.savez(buffer, sha256=np.array(_digest(arrays)), **dict(zip(_NAMES, arrays, strict=True)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue())
    except OSError as error:
        logger.info("mnist1d: not kept in %s (%s)", path.parent, error)
