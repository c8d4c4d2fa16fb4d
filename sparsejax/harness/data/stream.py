"""The training data stream and the test batches: epochs of shuffled batches
(:func:`train_batches`), the position of a batch in the stream (:class:`DataPosition`),
CIFAR's crop-and-flip augmentation, and the test set in order (:func:`test_batches`).

Batching is keyed only by ``(seed, epoch)`` (order) and ``(seed, epoch, batch)``
(augmentation), so a run restarted at a :class:`DataPosition` sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from sparsejax.harness.data.dataset import Batch, Dataset

__all__ = ["DataPosition", "steps_per_epoch", "epoch_permutation", "random_crop_and_flip",
           "train_batches", "test_batches"]

_AUGMENTED_BY_DEFAULT = frozenset({"cifar10", "cifar100"})


class DataPosition(NamedTuple):
    """Where a training data stream is: ``batch`` is the index of a batch within ``epoch``."""

    epoch: int
    batch: int

    @classmethod
    def from_step(cls, step: int, batches_per_epoch: int) -> DataPosition:
        """The position of the ``step``-th batch (counting from 0) of a stream.

        >>> DataPosition.from_step(7, batches_per_epoch=3)
        DataPosition(epoch=2, batch=1)
        """
        return cls(*divmod(step, batches_per_epoch))

    def advance(self, batches_per_epoch: int) -> DataPosition:
        """The position of the batch after this one.

        >>> DataPosition(0, 2).advance(batches_per_epoch=3)
        DataPosition(epoch=1, batch=0)
        """
        return DataPosition.from_step(self.epoch * batches_per_epoch + self.batch + 1,
                                      batches_per_epoch)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of full batches in an epoch (the last partial batch is dropped).

    >>> steps_per_epoch(10, 4)
    2
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return num_examples // batch_size


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of ``epoch``, a function of ``(seed, epoch)`` only.

    The generator is the ``epoch``-th child of ``SeedSequence(seed)`` (not
    ``default_rng([seed, epoch])``: numpy ignores trailing zero words of the entropy, so
    ``[seed, epoch, 0]`` would repeat the stream of ``[seed, epoch]``).

    >>> order = epoch_permutation(seed=0, epoch=3, num_examples=5)
    >>> sorted(order.tolist()), bool((order == epoch_permutation(0, 3, 5)).all())
    ([0, 1, 2, 3, 4], True)
    """
    return _generator(seed, epoch).permutation(num_examples)


def _generator(seed: int, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=path))


def random_crop_and_flip(
    images: np.ndarray, rng: np.random.Generator, padding: int = 4
) -> np.ndarray:
    """Random ``padding``-pixel translation crop and horizontal flip of NHWC images.

    Each image is padded with zeros (the dataset mean, after normalisation) on every
    side, cropped back to its size at a random offset, and mirrored with probability 1/2.

    >>> images = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    >>> random_crop_and_flip(images, np.random.default_rng(0), padding=1).shape
    (2, 3, 3, 1)
    """
    count, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    top = rng.integers(0, 2 * padding + 1, count)
    left = rng.integers(0, 2 * padding + 1, count)
    flip = rng.random(count) < 0.5
    rows = top[:, None] + np.arange(height)
    columns = left[:, None] + np.arange(width)
    columns = np.where(flip[:, None], columns[:, ::-1], columns)
    return padded[np.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]]


_STREAM_START = DataPosition(0, 0)


def train_batches(
    dataset: Dataset, batch_size: int, seed: int, start: DataPosition = _STREAM_START,
    *, augment: bool | None = None,
) -> Iterator[tuple[DataPosition, Batch]]:
    """Endless shuffled training batches, ``(position of the batch, {"image", "label"})``.

    Each epoch is a fresh permutation (:func:`epoch_permutation`); its last partial batch
    is dropped. Starting at ``start`` yields exactly what an uninterrupted stream yields
    from that position on. ``augment`` (``None``: on for CIFAR, off otherwise) applies
    :func:`random_crop_and_flip` with a generator keyed by ``(seed, epoch, batch)``.

    >>> tiny = Dataset("tiny", np.arange(10, dtype=np.float32)[:, None],
    ...                np.arange(10, dtype=np.int32), np.zeros((3, 1), np.float32),
    ...                np.zeros(3, np.int32), num_classes=10)
    >>> stream = train_batches(tiny, batch_size=4, seed=0)
    >>> [next(stream)[0] for _ in range(3)]
    [DataPosition(epoch=0, batch=0), DataPosition(epoch=0, batch=1), DataPosition(epoch=1, batch=0)]
    >>> _, batch = next(train_batches(tiny, 4, seed=0, start=DataPosition(1, 1)))
    >>> _, same_batch = next(stream)
    >>> bool((batch["label"] == same_batch["label"]).all()), batch["image"].shape
    (True, (4, 1))
    """
    num_examples = len(dataset.train_labels)
    batches_per_epoch = steps_per_epoch(num_examples, batch_size)
    if batches_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
    if start.epoch < 0 or not 0 <= start.batch < batches_per_epoch:
        raise ValueError(f"{start} is outside epochs of {batches_per_epoch} batches")
    if augment is None:
        augment = dataset.name in _AUGMENTED_BY_DEFAULT
    if augment and dataset.train_images.ndim != 4:
        raise ValueError(f"augmentation needs NHWC images, {dataset.name} has shape "
                         f"{dataset.input_shape}")
    return _stream_train_batches(dataset, batch_size, seed, start, batches_per_epoch, augment)


def _stream_train_batches(
    dataset: Dataset, batch_size: int, seed: int, start: DataPosition, batches_per_epoch: int,
    augment: bool,
) -> Iterator[tuple[DataPosition, Batch]]:
    epoch, first_batch = start
    while True:
        order = epoch_permutation(seed, epoch, len(dataset.train_labels))
        for batch_index in range(first_batch, batches_per_epoch):
            indices = order[batch_index * batch_size:(batch_index + 1) * batch_size]
            images = dataset.train_images[indices]
            if augment:
                images = random_crop_and_flip(images, _generator(seed, epoch, batch_index))
            position = DataPosition(epoch, batch_index)
            yield position, {"image": images, "label": dataset.train_labels[indices]}
        epoch, first_batch = epoch + 1, 0


def test_batches(dataset: Dataset, batch_size: int) -> Iterator[Batch]:
    """The test set in order, in batches of ``batch_size``; the last one may be smaller.

    >>> tiny = Dataset("tiny", np.zeros((2, 1), np.float32), np.zeros(2, np.int32),
    ...                np.arange(5, dtype=np.float32)[:, None], np.arange(5, dtype=np.int32),
    ...                num_classes=5)
    >>> [batch["label"].tolist() for batch in test_batches(tiny, batch_size=2)]
    [[0, 1], [2, 3], [4]]
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for begin in range(0, len(dataset.test_labels), batch_size):
        yield {
            "image": dataset.test_images[begin:begin + batch_size],
            "label": dataset.test_labels[begin:begin + batch_size],
        }


test_batches.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
