"""Named classification datasets in host memory, with deterministic, resumable batching.

>>> data = load_dataset("mnist1d", seed=0)
>>> position, batch = next(train_batches(data, batch_size=32, seed=0))
>>> position, batch["image"].shape, batch["label"].shape
(DataPosition(epoch=0, batch=0), (32, 40, 1), (32,))

The modules, each importing only those above it:

* :mod:`~sparsejax.harness.data.dataset`: the dataset names and their facts, the
  :class:`Dataset` (layouts, fingerprint) and :class:`DatasetNotAvailableError`;
* :mod:`~sparsejax.harness.data.checks`: the checks on loaded examples;
* :mod:`~sparsejax.harness.data.idx`, :mod:`~sparsejax.harness.data.tfds`,
  :mod:`~sparsejax.harness.data.mnist1d`, :mod:`~sparsejax.harness.data.text`: the
  sources (IDX files, TensorFlow Datasets, the generated MNIST-1D, a text corpus);
* :mod:`~sparsejax.harness.data.loading`: :func:`load_dataset` over those sources, and
  :func:`split_validation`;
* :mod:`~sparsejax.harness.data.stream`: the epoch/batch stream (:func:`train_batches`,
  :class:`DataPosition`) and :func:`test_batches`;
* :mod:`~sparsejax.harness.data.sharding`: a process's slice of a global batch.
"""

from sparsejax.harness.data.checks import check_examples
from sparsejax.harness.data.dataset import (
    DATASET_NAMES,
    IMAGE_MEAN_STD,
    TEXT_DATASETS,
    TEXT_FILE,
    Batch,
    Dataset,
    DatasetNotAvailableError,
)
from sparsejax.harness.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx
from sparsejax.harness.data.loading import VALIDATION_SEED, load_dataset, split_validation
from sparsejax.harness.data.sharding import shard_for_process
from sparsejax.harness.data.stream import (
    DataPosition,
    epoch_permutation,
    random_crop_and_flip,
    steps_per_epoch,
    test_batches,
    train_batches,
)
from sparsejax.harness.data.text import DEFAULT_CONTEXT, TEXT_TRAIN_FRACTION
from sparsejax.harness.data.tfds import tfds_sources

__all__ = [
    "DATASET_NAMES",
    "TEXT_DATASETS",
    "TEXT_FILE",
    "DEFAULT_CONTEXT",
    "TEXT_TRAIN_FRACTION",
    "IMAGE_MEAN_STD",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "Batch",
    "Dataset",
    "DatasetNotAvailableError",
    "load_dataset",
    "VALIDATION_SEED",
    "split_validation",
    "read_idx",
    "tfds_sources",
    "check_examples",
    "DataPosition",
    "steps_per_epoch",
    "epoch_permutation",
    "random_crop_and_flip",
    "train_batches",
    "test_batches",
    "shard_for_process",
]
