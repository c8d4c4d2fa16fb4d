"""What a dataset is: the names known (:data:`DATASET_NAMES`), the facts of each (classes,
image shape, the channel mean and standard deviation its images are standardised with),
the :class:`Dataset` held in host memory with its :meth:`~Dataset.fingerprint`, and the
error of a dataset that is not on this machine.

Arrays are numpy: images ``float32``, normalised with per-dataset channel mean/std
constants (:func:`normalise_images`); labels ``int32``. Layouts:

* ``mnist``, ``fashion_mnist``: ``(N, 28, 28, 1)`` (NHWC);
* ``cifar10``, ``cifar100``: ``(N, 32, 32, 3)`` (NHWC);
* ``mnist1d``: ``(N, 40, 1)`` (length, channels: ready for a 1-D convolution, an MLP
  flattens it). The ``mnist1d`` package already standardises the whole dataset to mean 0
  and standard deviation 1, so no further constants are applied.
* ``tinyshakespeare`` (character-level language modelling, read from ``DIR/input.txt``):
  "images" are ``int32`` character ids ``(N, context)`` and labels the next character of
  each position, ``(N, context)`` ``int32``; ``num_classes`` is the vocabulary size (the
  sorted distinct characters of the whole file, kept in ``Dataset.vocabulary``). The first
  90% of the characters train and the last 10% are the validation text, which plays the
  role of the test split. Training examples are the windows at *every* offset of the
  training text (stride 1, like nanoGPT's random windows; read-only numpy views, no copy);
  validation examples are consecutive non-overlapping windows (stride ``context``), so a
  test evaluation scores every validation character once, as the next character of a
  prefix of 0 to ``context - 1`` characters (loss in nats per character;
  :mod:`sparsejax.harness.data.text`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["DATASET_NAMES", "TEXT_DATASETS", "TEXT_FILE", "NUM_CLASSES", "IMAGE_SHAPES",
           "IMAGE_MEAN_STD", "Batch", "Dataset", "DatasetNotAvailableError",
           "normalise_images"]

DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "cifar100", "mnist1d",
                                  "tinyshakespeare")

TEXT_DATASETS = frozenset({"tinyshakespeare"})
"""Character-level datasets, read from ``DIR/input.txt`` (see the module docstring)."""
TEXT_FILE = "input.txt"

NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "mnist1d": 10}
IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                "cifar100": (32, 32, 3)}

# Channel mean and standard deviation of the training images, on the [0, 1] pixel scale.
IMAGE_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

Batch = dict[str, np.ndarray]


class Dataset(NamedTuple):
    """A classification dataset held in host memory (see the module docstring for layouts)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    vocabulary: str | None = None  # text datasets: the character of each id

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(28, 28, 1)`` for MNIST."""
        return tuple(self.train_images.shape[1:])

    def fingerprint(self) -> dict[str, object]:
        """What a resumed run checks it trains on the same data, cheaply: the sizes and a
        SHA-256 of 64 examples of each split spread over it (first, last and between),
        images and labels.

        >>> d = Dataset("toy", np.zeros((5, 2), np.float32), np.arange(5),
        ...             np.ones((3, 2), np.float32), np.zeros(3, np.int64), num_classes=5)
        >>> d.fingerprint()["train"], d.fingerprint()["test"]
        (5, 3)
        """
        import hashlib

        digest = hashlib.sha256()
        for images, labels in ((self.train_images, self.train_labels),
                               (self.test_images, self.test_labels)):
            picked = np.unique(np.linspace(0, max(len(labels) - 1, 0), 64).astype(np.int64))
            if len(labels):
                digest.update(np.ascontiguousarray(images[picked]).tobytes())
                digest.update(np.ascontiguousarray(labels[picked]).astype(np.int64).tobytes())
        return {"name": self.name, "train": int(len(self.train_labels)),
                "test": int(len(self.test_labels)), "input_shape": list(self.input_shape),
                "num_classes": int(self.num_classes), "sample_sha256": digest.hexdigest()}


class DatasetNotAvailableError(FileNotFoundError):
    """The dataset is not on this machine and could not be fetched."""


def normalise_images(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 NHWC images -> float32, scaled to [0, 1], then channel-standardised."""
    mean, std = IMAGE_MEAN_STD[name]
    normalised = images.astype(np.float32)
    normalised /= 255.0
    normalised -= np.asarray(mean, np.float32)
    normalised /= np.asarray(std, np.float32)
    return normalised
