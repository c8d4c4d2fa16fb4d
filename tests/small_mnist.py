"""Real MNIST, cut short, for tests that run the harness on real images: the first
examples of ``../shared/data/mnist`` (or ``$SPARSEJAX_MNIST``) written as the four IDX
files the harness reads. Reading, normalising and evaluating the full 70,000 images took
most of such a test's time (2.6 s of loading per run and 1.5 s per evaluation, at the
tests' XLA flags); what these tests check (a warning, an evaluation that recomputes
batch-norm statistics) holds on any real images.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import pytest

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def real_mnist_dir() -> Path:
    """The folder of the real MNIST IDX files (skips the test where there is none)."""
    folder = Path(os.environ.get("SPARSEJAX_MNIST",
                                 Path(__file__).resolve().parents[2] / "shared/data/mnist"))
    if not folder.exists():
        pytest.skip("real MNIST not available")
    return folder


def _read(path: Path) -> bytes:
    gz = path.with_name(path.name + ".gz")
    return gzip.decompress(gz.read_bytes()) if gz.exists() else path.read_bytes()


def _first(idx: bytes, count: int) -> bytes:
    """The IDX file ``idx`` holding only its first ``count`` records."""
    ndim = idx[3]
    dims = struct.unpack(f">{ndim}I", idx[4:4 + 4 * ndim])
    record = 1
    for d in dims[1:]:
        record *= d
    start = 4 + 4 * ndim
    return (idx[:4] + struct.pack(f">{ndim}I", min(count, dims[0]), *dims[1:])
            + idx[start:start + min(count, dims[0]) * record])


def small_mnist(folder: Path, train: int = 1000, test: int = 500) -> Path:
    """Write the first ``train`` training and ``test`` test examples of real MNIST into
    ``folder`` as IDX files, and return it (skips the test without real MNIST)."""
    source = real_mnist_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        for name in _FILES[prefix]:
            (folder / name).write_bytes(_first(_read(source / name), count))
    return folder
