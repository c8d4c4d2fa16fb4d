"""MNIST and Fashion-MNIST from their four original IDX files (raw or ``.gz``) in a
folder: :func:`read_idx` reads one, with a clear ``ValueError`` naming a corrupt or
truncated file; :func:`load_idx_dataset` reads the four into a :class:`Dataset`.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sparsejax.harness.data.checks import check_examples
from sparsejax.harness.data.dataset import (
    NUM_CLASSES,
    Dataset,
    DatasetNotAvailableError,
    normalise_images,
)

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "IDX_DATASETS", "IDX_FILE_STEMS",
           "read_idx", "find_idx_files", "load_idx_dataset"]

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_IDX_UNSIGNED_BYTE = 0x08
IDX_DATASETS = frozenset({"mnist", "fashion_mnist"})
IDX_FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGE_SIZE = (28, 28)


def read_idx(path: str | os.PathLike[str], expected_magic: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file (raw or ``.gz``) into a uint8 array.

    ``expected_magic`` is :data:`IDX_IMAGES_MAGIC` (2051) or :data:`IDX_LABELS_MAGIC`
    (2049); a different magic number, a short header or a data size that does not match
    the header raise a ``ValueError`` naming the file.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
    >>> _ = path.write_bytes((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
    >>> read_idx(path, IDX_LABELS_MAGIC)
    array([7, 0, 9], dtype=uint8)
    """
    if expected_magic >> 8 != _IDX_UNSIGNED_BYTE:
        raise ValueError(f"magic {expected_magic} is not an unsigned-byte IDX magic number")
    path = Path(path)
    content = _read_file_bytes(path)
    if len(content) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(content)} bytes, no magic number)")
    magic = int.from_bytes(content[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number is {magic}, expected {expected_magic}")
    num_dims = magic & 0xFF
    header_size = 4 + 4 * num_dims
    if len(content) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(content)} of {header_size} bytes)")
    shape = tuple(int(size) for size in np.frombuffer(content, ">u4", num_dims, offset=4))
    expected_size = int(np.prod(shape))
    data_size = len(content) - header_size
    if data_size != expected_size:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected_size} bytes of data) but "
            f"the file holds {data_size} bytes of data (truncated or corrupt file)"
        )
    return np.frombuffer(content, np.uint8, offset=header_size).reshape(shape)


def _read_file_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as compressed:
            return compressed.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a readable gzip file ({error})") from error


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Paths of the four IDX files in ``directory``; ``None`` when it holds none of them."""
    found = {}
    for role, stem in IDX_FILE_STEMS.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
    if not found:
        return None
    missing = [stem for role, stem in IDX_FILE_STEMS.items() if role not in found]
    if missing:
        raise DatasetNotAvailableError(
            f"{directory} holds some of the IDX files but not {', '.join(missing)} "
            "(raw or .gz)"
        )
    return found


def load_idx_dataset(name: str, idx_paths: Mapping[str, Path]) -> Dataset:
    splits = {}
    for split in ("train", "test"):
        images_path, labels_path = idx_paths[f"{split}_images"], idx_paths[f"{split}_labels"]
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC)
        if images.shape[1:] != _IDX_IMAGE_SIZE:
            raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
        if len(images) == 0:
            raise ValueError(f"{images_path}: holds 0 {split} examples (an empty IDX file)")
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path} holds {len(images)} images but {labels_path} holds "
                f"{len(labels)} labels"
            )
        images = images[..., None]
        check_examples(name, images, labels, images_from=str(images_path),
                       labels_from=str(labels_path))
        splits[split] = (normalise_images(images, name), labels.astype(np.int32))
    return Dataset(name, *splits["train"], *splits["test"], num_classes=NUM_CLASSES[name])

