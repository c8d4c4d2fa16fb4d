"""The one way in: :func:`load_dataset` reads a named dataset into host memory from
whichever source has it (generated ``mnist1d``, IDX files, a text file, TFDS), and
:func:`split_validation` holds training examples out as a validation set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sparsejax.core.validation import is_int
from sparsejax.harness.data.dataset import DATASET_NAMES, TEXT_DATASETS, Dataset
from sparsejax.harness.data.idx import IDX_DATASETS, find_idx_files, load_idx_dataset
from sparsejax.harness.data.mnist1d import generate_mnist1d
from sparsejax.harness.data.text import DEFAULT_CONTEXT, load_text_dataset
from sparsejax.harness.data.tfds import load_from_tfds

__all__ = ["load_dataset", "VALIDATION_SEED", "split_validation"]


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0,
    download: bool = False, context: int | None = None,
) -> Dataset:
    """Loads dataset ``name`` (one of :data:`DATASET_NAMES`) fully into host memory.

    * ``mnist1d`` is generated locally by the ``mnist1d`` package from ``seed``
      (4000 train / 1000 test examples; the package's own default seed is 42); it
      never reads ``data_dir`` or the network.
    * ``mnist`` and ``fashion_mnist`` are read from the four original IDX files when
      ``data_dir`` holds them (``train-images-idx3-ubyte[.gz]``, ...).
    * Otherwise the dataset is read through TensorFlow Datasets' ``data_source``
      (array_record files, no TensorFlow needed) from ``data_dir`` (``None``: the TFDS
      default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). TFDS downloads and
      prepares it only when ``download`` is true: without network TFDS retries for
      minutes before giving up, so it is never tried unasked.
    * ``tinyshakespeare`` is read from ``data_dir/input.txt`` (any UTF-8 text works), else
      through TFDS's ``tiny_shakespeare`` (the same text), and cut into windows of
      ``context`` characters (``None``: :data:`DEFAULT_CONTEXT`;
      :mod:`sparsejax.harness.data.text`);
      ``context`` is ignored by the other datasets.

    Images are standardised, not only scaled: the ``uint8`` pixels of ``mnist``,
    ``fashion_mnist``, ``cifar10`` and ``cifar100`` become ``(x / 255 - mean) / std`` per
    channel, with the mean and standard deviation of the training images (MNIST: 0.1307
    and 0.3081), so they are centred near 0 with unit spread rather than in [0, 1];
    ``mnist1d`` comes standardised by its package.

    Raises ``ValueError`` for an unknown name or a corrupt IDX file, and
    :class:`DatasetNotAvailableError` when the data is neither present nor obtainable.

    >>> data = load_dataset("mnist1d", seed=0)
    >>> data.train_images.shape, data.test_images.shape, data.input_shape
    ((4000, 40, 1), (1000, 40, 1), (40, 1))
    >>> data.train_images.dtype, data.train_labels.dtype, data.num_classes
    (dtype('float32'), dtype('int32'), 10)
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if name == "mnist1d":
        return generate_mnist1d(seed)
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ValueError(f"data_dir (CLI: --data-dir) {data_dir} is a file, not a folder: "
                         f"pass the folder that holds the {name} files")
    if name in TEXT_DATASETS:
        return load_text_dataset(name, data_dir, DEFAULT_CONTEXT if context is None else context,
                                 download)
    if name in IDX_DATASETS and data_dir is not None:
        idx_paths = find_idx_files(Path(data_dir))
        if idx_paths is not None:
            return load_idx_dataset(name, idx_paths)
    return load_from_tfds(name, data_dir, download)


VALIDATION_SEED = 0
"""Seed of the held-out choice of :func:`split_validation`: the same examples are held
out in every run (whatever its ``--seed``), so runs of different seeds train on one set."""


def split_validation(dataset: Dataset, size: int,
                     seed: int = VALIDATION_SEED) -> tuple[Dataset, Dataset]:
    """``(train, validation)``: ``size`` training examples held out, chosen by a seeded
    permutation (both parts keep the original order). ``train`` is ``dataset`` with the
    rest of the training set and the test set unchanged; ``validation`` is a
    :class:`Dataset` whose *test* split holds the held-out examples (its train split is
    empty), so every evaluation function takes it as it takes a test set.

    >>> data = load_dataset("mnist1d", seed=0)
    >>> train, validation = split_validation(data, 400)
    >>> len(train.train_labels), len(validation.test_labels), len(train.test_labels)
    (3600, 400, 1000)
    """
    if dataset.vocabulary is not None:
        raise ValueError(f"validation_size (CLI: --validation-size) holds out training "
                         f"examples, but {dataset.name}'s overlapping text windows share "
                         f"all but one character with their neighbours; its test split is "
                         f"already the held-out last 10% of the text")
    total = len(dataset.train_labels)
    if not is_int(size) or not 0 < size < total:
        raise ValueError(f"validation_size (CLI: --validation-size) must be an integer in "
                         f"[1, {total - 1}] for the {total} training examples of "
                         f"{dataset.name}, got {size!r}")
    order = np.random.default_rng(np.random.SeedSequence(seed)).permutation(total)
    held, kept = np.sort(order[:size]), np.sort(order[size:])
    images, labels = dataset.train_images, dataset.train_labels
    train = dataset._replace(train_images=images[kept], train_labels=labels[kept])
    validation = dataset._replace(train_images=images[:0], train_labels=labels[:0],
                                  test_images=images[held], test_labels=labels[held])
    return train, validation
