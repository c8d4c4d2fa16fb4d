"""Character-level text datasets (``tinyshakespeare``): next-character windows.

The text comes from ``DIR/input.txt`` (any UTF-8 text) when ``data_dir`` holds one, else
from TFDS's ``tiny_shakespeare`` (the same 1.1 MB text, through its array_record data
source, downloaded only when asked). Either way the first 90% of the characters train
(every window of ``context`` characters, shifted by one for the labels) and the rest is the
held-out split (non-overlapping windows); TFDS's train split is that 90%, its validation
and test splits the rest, so both sources give the same dataset. The vocabulary is the
sorted set of characters in the whole text.

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "input.txt").write_text("abcabcabca" * 10)
>>> data = load_text_dataset("tinyshakespeare", folder, context=4)
>>> data.vocabulary, data.train_images.shape, data.test_images.shape
('abc', (86, 4), (2, 4))
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from sparsejax.core.validation import is_int
from sparsejax.harness.data.dataset import TEXT_FILE, Dataset, DatasetNotAvailableError
from sparsejax.harness.data.tfds import tfds_sources

__all__ = ["DEFAULT_CONTEXT", "TEXT_TRAIN_FRACTION", "load_text_dataset", "text_windows"]

DEFAULT_CONTEXT = 64
"""Characters per example of a text dataset when no ``context`` is given (the GPT's
default context)."""
TEXT_TRAIN_FRACTION = 0.9
TFDS_NAME = "tiny_shakespeare"


def load_text_dataset(name: str, data_dir: str | os.PathLike[str] | None, context: int,
                      download: bool = False) -> Dataset:
    """The text dataset ``name`` in windows of ``context`` characters (module docstring);
    ``DatasetNotAvailableError`` naming both ways to provide it when neither has it."""
    if not is_int(context) or context < 1:
        raise ValueError(f"context must be a positive int, got {context!r}")
    path = None if data_dir is None else Path(data_dir) / TEXT_FILE
    if path is not None and path.is_file():
        stat = path.stat()
        return _file_dataset(name, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                             int(context))
    try:
        train, *held_out = tfds_sources(name, TFDS_NAME, ["train", "validation", "test"],
                                        data_dir, download)
    except DatasetNotAvailableError as error:
        if path is None:
            raise
        raise DatasetNotAvailableError(f"{path} not found, and {error}") from error
    return text_windows(name, _text_of(train), "".join(map(_text_of, held_out)),
                        int(context), source=f"TFDS {TFDS_NAME}")


def _text_of(source: Any) -> str:
    """The text of a TFDS split (one record; bytes or str, as TFDS decodes it)."""
    parts = [record["text"] for record in source]
    return "".join(p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in parts)


@functools.lru_cache(maxsize=4)
def _file_dataset(name: str, path: str, size: int, mtime_ns: int, context: int) -> Dataset:
    # size and mtime key the cache, so a file changed on disk is read again.
    del size, mtime_ns
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error
    split = int(len(text) * TEXT_TRAIN_FRACTION)
    return text_windows(name, text[:split], text[split:], context, source=path)


def text_windows(name: str, train_text: str, held_out_text: str, context: int, *,
                 source: str) -> Dataset:
    """Character ids in windows: every ``context``-long window of ``train_text`` (labels:
    the next characters) and the non-overlapping windows of ``held_out_text``.

    >>> data = text_windows("t", "abcdab", "cdabc", 2, source="example")
    >>> data.train_images.tolist(), data.train_labels.tolist()
    ([[0, 1], [1, 2], [2, 3], [3, 0]], [[1, 2], [2, 3], [3, 0], [0, 1]])
    >>> data.test_images.tolist(), data.test_labels.tolist()
    ([[2, 3], [0, 1]], [[3, 0], [1, 2]])
    """
    vocabulary = "".join(sorted(set(train_text + held_out_text)))
    lookup = np.zeros(max(map(ord, vocabulary), default=0) + 1, np.int32)
    lookup[[ord(c) for c in vocabulary]] = np.arange(len(vocabulary), dtype=np.int32)

    def ids(text: str) -> np.ndarray:
        return lookup[np.frombuffer(text.encode("utf-32-le"), np.uint32)]

    train, valid = ids(train_text), ids(held_out_text)
    num_valid = (len(valid) - 1) // context
    if len(train) <= context or num_valid < 1:
        raise ValueError(
            f"{source}: {len(train) + len(valid)} characters are too few for windows of "
            f"context={context} (the first {TEXT_TRAIN_FRACTION:.0%} must hold more than "
            f"{context} characters and the rest at least {context + 1})")
    windows = np.lib.stride_tricks.sliding_window_view
    arrays = [windows(train[:-1], context), windows(train[1:], context),
              valid[:num_valid * context].reshape(num_valid, context),
              valid[1:num_valid * context + 1].reshape(num_valid, context)]
    for array in arrays:
        array.flags.writeable = False
    return Dataset(name, *arrays, num_classes=len(vocabulary), vocabulary=vocabulary)
