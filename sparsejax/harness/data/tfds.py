"""Datasets through TensorFlow Datasets' ``data_source`` (array_record files, no
TensorFlow needed): :func:`tfds_sources` gives a dataset's splits, or a
:class:`DatasetNotAvailableError` saying how to provide it; :func:`load_from_tfds` reads
an image dataset's train and test splits, checked and standardised.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparsejax.harness._extras import require
from sparsejax.harness.data.checks import check_examples
from sparsejax.harness.data.dataset import (
    NUM_CLASSES,
    TEXT_DATASETS,
    TEXT_FILE,
    Dataset,
    DatasetNotAvailableError,
    normalise_images,
)
from sparsejax.harness.data.idx import IDX_DATASETS, IDX_FILE_STEMS

__all__ = ["tfds_sources", "load_from_tfds"]


def tfds_sources(name: str, tfds_name: str, splits: list[str],
                 data_dir: str | os.PathLike[str] | None, download: bool) -> list[Any]:
    """TFDS's data sources of ``splits`` of ``tfds_name`` (array_record, no TensorFlow);
    :class:`DatasetNotAvailableError` saying how to provide it when it is missing."""
    tfds = require("tensorflow_datasets")  # the ``data`` extra

    try:
        return [tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                                 download=download) for split in splits]
    # What TFDS raises for a missing dataset depends on the case: a NotImplementedError
    # about the TFRecord format, a KeyError about empty splits (default data_dir absent),
    # requests' ConnectionError after minutes of retries (download=True, no network), an
    # ImportError from a missing optional dependency of its downloader.
    except Exception as error:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        prepared = builder.is_prepared()
        if prepared and not isinstance(error, NotImplementedError):
            raise
        raise DatasetNotAvailableError(
            _not_available_message(name, builder.data_dir, prepared, download, error)
        ) from error


def load_from_tfds(name: str, data_dir: str | os.PathLike[str] | None, download: bool) -> Dataset:
    train_source, test_source = tfds_sources(name, name, ["train", "test"], data_dir, download)
    train_images, train_labels = _read_data_source(train_source, f"TFDS {name} train split")
    test_images, test_labels = _read_data_source(test_source, f"TFDS {name} test split")
    for split, images, labels in (("train", train_images, train_labels),
                                  ("test", test_images, test_labels)):
        where = f"TFDS {name} {split} split"
        check_examples(name, images, labels, images_from=where, labels_from=where)
    return Dataset(
        name,
        normalise_images(train_images, name),
        train_labels,
        normalise_images(test_images, name),
        test_labels,
        num_classes=NUM_CLASSES[name],
    )


def _read_data_source(source: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    # One record at a time: `__getitems__` would batch reads, but the data sources of
    # `tfds.testing.mock_data` (tfds 4.9.10) do not implement it.
    examples = list(source)
    if not examples:
        raise ValueError(f"{where}: holds 0 examples (an empty split)")
    shapes = {np.shape(example["image"]) for example in examples}
    if len(shapes) > 1:
        raise ValueError(f"{where}: images of several shapes ({sorted(shapes)[:3]})")
    images = np.stack([np.asarray(example["image"]) for example in examples])
    raw = np.asarray([example["label"] for example in examples])
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integer class ids, got {raw.dtype} "
                         f"(e.g. {raw.ravel()[0]!r})")
    return images, raw.astype(np.int32)


def _not_available_message(
    name: str, location: str | os.PathLike[str], prepared: bool, download: bool,
    error: Exception,
) -> str:
    reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    if prepared:
        problem = (
            f"dataset {name!r} is prepared in {location} but cannot be read without "
            f"TensorFlow ({reason}); it was probably prepared in TFRecord format by "
            "tfds.load. Prepare it again in array_record format in another data_dir."
        )
    elif download:
        problem = (
            f"dataset {name!r} could not be downloaded and prepared in {location} "
            f"({reason})."
        )
    else:
        problem = f"dataset {name!r} is not prepared in {location} and download=False."
    how_to_provide = (
        " To provide it, run once with network access and download=True "
        "so that TFDS prepares it in data_dir (default $TFDS_DATA_DIR or "
        "~/tensorflow_datasets)"
    )
    if name in TEXT_DATASETS:
        how_to_provide += f", or pass data_dir (CLI: --data-dir) holding the text as {TEXT_FILE}"
    if name in IDX_DATASETS:
        how_to_provide += (
            ", or pass data_dir (CLI: --data-dir) pointing at a folder with the four IDX "
            f"files ({', '.join(stem + '[.gz]' for stem in IDX_FILE_STEMS.values())})"
        )
    return problem + how_to_provide + "."
