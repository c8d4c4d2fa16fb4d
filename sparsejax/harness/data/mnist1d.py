"""``mnist1d``, generated locally by the ``mnist1d`` package from a seed (4000 train / 1000
test examples), once per seed in a process (:func:`generate_mnist1d`), and kept on disk
for the next process.

Importing ``mnist1d`` (it pulls in matplotlib) and generating its 5000 examples takes
2-5 s of Python, about half of a warm ``sparsejax train`` start on LeNet-300-100. The
arrays are written once per seed and ``mnist1d`` version to :func:`cache_dir` (default
``$XDG_CACHE_HOME/sparsejax``, else ``~/.cache/sparsejax``; the environment variable
``SPARSEJAX_CACHE_DIR`` names another folder, or turns the cache off when empty), and
read back from there without importing the package. A file that cannot be read, or
holds arrays of other shapes or types, is generated and written again; a folder that
cannot be written only costs the time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import random
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np

from sparsejax.harness._extras import require
from sparsejax.harness.data.dataset import NUM_CLASSES, Dataset

__all__ = ["cache_dir", "generate_mnist1d"]

logger = logging.getLogger(__name__)

CACHE_ENV = "SPARSEJAX_CACHE_DIR"
_TRAIN, _TEST, _LENGTH = 4000, 1000, 40  # mnist1d's default split and signal length


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


_EXPECTED = (("x", np.float32, (_TRAIN, _LENGTH, 1)), ("y", np.int32, (_TRAIN,)),
             ("x_test", np.float32, (_TEST, _LENGTH, 1)), ("y_test", np.int32, (_TEST,)))


def _read(path: Path) -> list[np.ndarray] | None:
    """The arrays kept in ``path``, or ``None`` if it is missing, unreadable or holds
    anything but mnist1d's four arrays of their shapes, types and labels."""
    try:
        with np.load(path, allow_pickle=False) as file:
            arrays = [file[name] for name, _, _ in _EXPECTED]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logger.warning("mnist1d: the cached %s is unreadable (%s); generating it again",
                       path, error)
        return None
    for array, (name, dtype, shape) in zip(arrays, _EXPECTED, strict=True):
        if array.dtype != dtype or array.shape != shape or (
                name.startswith("y") and not ((array >= 0) & (array < 10)).all()):
            logger.warning("mnist1d: the cached %s holds %s %s as %r; generating it again",
                           path, array.dtype, array.shape, name)
            return None
    return arrays


def _write(path: Path, arrays: list[np.ndarray]) -> None:
    """Keep ``arrays`` in ``path``, written whole or not at all (a temporary file in the
    same folder, then renamed); a folder that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    except OSError as error:
        logger.info("mnist1d: not kept in %s (%s)", path.parent, error)
        return
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **{name: a for (name, _, _), a in zip(_EXPECTED, arrays,
                                                                  strict=True)})
        os.replace(temporary, path)
    except OSError as error:
        logger.info("mnist1d: not kept in %s (%s)", path.parent, error)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
