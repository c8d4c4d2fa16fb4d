"""Named classification datasets in host memory, with deterministic, resumable batching.

Arrays are numpy: images ``float32``, normalised with per-dataset channel mean/std
constants; labels ``int32``. Layouts:

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
  prefix of 0 to ``context - 1`` characters (loss in nats per character).

Batching is keyed only by ``(seed, epoch)`` (order) and ``(seed, epoch, batch)``
(augmentation), so a run restarted at a :class:`DataPosition` sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from sparsejax.core.validation import is_int
from sparsejax.harness._extras import require

DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10", "cifar100", "mnist1d",
                                  "tinyshakespeare")

TEXT_DATASETS = frozenset({"tinyshakespeare"})
"""Character-level datasets, read from ``DIR/input.txt`` (see the module docstring)."""
TEXT_FILE = "input.txt"
DEFAULT_CONTEXT = 64
"""Characters per example of a text dataset when no ``context`` is given (the GPT's
default context)."""
TEXT_TRAIN_FRACTION = 0.9

_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "mnist1d": 10}
_IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3),
                 "cifar100": (32, 32, 3)}

# Channel mean and standard deviation of the training images, on the [0, 1] pixel scale.
_IMAGE_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_AUGMENTED_BY_DEFAULT = frozenset({"cifar10", "cifar100"})

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_IDX_UNSIGNED_BYTE = 0x08
_IDX_DATASETS = frozenset({"mnist", "fashion_mnist"})
_IDX_FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGE_SIZE = (28, 28)

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


# --------------------------------------------------------------------------- loading


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
      :mod:`sparsejax.harness.data_text`);
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
        return _generate_mnist1d(seed)
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ValueError(f"data_dir (CLI: --data-dir) {data_dir} is a file, not a folder: "
                         f"pass the folder that holds the {name} files")
    if name in TEXT_DATASETS:
        from sparsejax.harness.data_text import load_text_dataset

        return load_text_dataset(name, data_dir, DEFAULT_CONTEXT if context is None else context,
                                 download)
    if name in _IDX_DATASETS and data_dir is not None:
        idx_paths = _find_idx_files(Path(data_dir))
        if idx_paths is not None:
            return _load_idx_dataset(name, idx_paths)
    return _load_from_tfds(name, data_dir, download)


def _generate_mnist1d(seed: int) -> Dataset:
    # mnist1d.data pulls in matplotlib and requests; import it only when needed (it comes
    # with the ``data`` extra).
    return _generated_mnist1d(require("mnist1d.data"), seed)


@functools.lru_cache(maxsize=4)
def _generated_mnist1d(mnist1d_data: ModuleType, seed: int) -> Dataset:
    # Generating takes about 1.5 s of Python loops; a process that trains several times
    # (a lottery run, a sweep, the tests) generates each seed once. The arrays are
    # read-only so that no caller can change what the next one gets.
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
    arrays = [generated["x"].astype(np.float32)[..., None], generated["y"].astype(np.int32),
              generated["x_test"].astype(np.float32)[..., None],
              generated["y_test"].astype(np.int32)]
    for array in arrays:
        array.flags.writeable = False
    return Dataset("mnist1d", *arrays, num_classes=_NUM_CLASSES["mnist1d"])


def _normalise_images(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 NHWC images -> float32, scaled to [0, 1], then channel-standardised."""
    mean, std = _IMAGE_MEAN_STD[name]
    normalised = images.astype(np.float32)
    normalised /= 255.0
    normalised -= np.asarray(mean, np.float32)
    normalised /= np.asarray(std, np.float32)
    return normalised


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


# --------------------------------------------------------------------------- IDX files


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


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Paths of the four IDX files in ``directory``; ``None`` when it holds none of them."""
    found = {}
    for role, stem in _IDX_FILE_STEMS.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
    if not found:
        return None
    missing = [stem for role, stem in _IDX_FILE_STEMS.items() if role not in found]
    if missing:
        raise DatasetNotAvailableError(
            f"{directory} holds some of the IDX files but not {', '.join(missing)} "
            "(raw or .gz)"
        )
    return found


def _load_idx_dataset(name: str, idx_paths: Mapping[str, Path]) -> Dataset:
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
        splits[split] = (_normalise_images(images, name), labels.astype(np.int32))
    return Dataset(name, *splits["train"], *splits["test"], num_classes=_NUM_CLASSES[name])


# --------------------------------------------------------------------------- TFDS


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


def _load_from_tfds(name: str, data_dir: str | os.PathLike[str] | None, download: bool) -> Dataset:
    train_source, test_source = tfds_sources(name, name, ["train", "test"], data_dir, download)
    train_images, train_labels = _read_data_source(train_source, f"TFDS {name} train split")
    test_images, test_labels = _read_data_source(test_source, f"TFDS {name} test split")
    for split, images, labels in (("train", train_images, train_labels),
                                  ("test", test_images, test_labels)):
        where = f"TFDS {name} {split} split"
        check_examples(name, images, labels, images_from=where, labels_from=where)
    return Dataset(
        name,
        _normalise_images(train_images, name),
        train_labels,
        _normalise_images(test_images, name),
        test_labels,
        num_classes=_NUM_CLASSES[name],
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


def check_examples(name: str, images: np.ndarray, labels: np.ndarray, *,
                   images_from: str, labels_from: str) -> None:
    """Refuse examples that ``name`` cannot hold, before any training: images that are not
    ``(N, *shape)`` of the dataset (e.g. 32x32x3 under the name mnist), non-finite pixels,
    labels outside ``0 .. num_classes - 1``. IDX files and TFDS data go through it alike.

    >>> check_examples("mnist", np.zeros((2, 28, 28, 1), np.uint8), np.array([0, 10]),
    ...                images_from="x", labels_from="labels.idx")
    Traceback (most recent call last):
    ...
    ValueError: labels.idx: label 10 is not a mnist class (0 to 9)
    """
    shape = _IMAGE_SHAPES.get(name)
    if shape is not None and tuple(images.shape[1:]) != shape:
        raise ValueError(f"{images_from}: images are {'x'.join(map(str, images.shape[1:]))}, "
                         f"a {name} image is {'x'.join(map(str, shape))}")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise ValueError(f"{images_from}: {int(np.size(images) - np.isfinite(images).sum())} "
                         "pixels are NaN or inf")
    classes = _NUM_CLASSES[name]
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
        raise ValueError(f"{labels_from}: label {bad[0]} is not a {name} class "
                         f"(0 to {classes - 1})")


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
    if name in _IDX_DATASETS:
        how_to_provide += (
            ", or pass data_dir (CLI: --data-dir) pointing at a folder with the four IDX "
            f"files ({', '.join(stem + '[.gz]' for stem in _IDX_FILE_STEMS.values())})"
        )
    return problem + how_to_provide + "."


# --------------------------------------------------------------------------- batching


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


def shard_for_process(
    batch: Mapping[str, np.ndarray], process_index: int, process_count: int
) -> Batch:
    """This process's contiguous slice of a global batch (multi-host data parallelism).

    >>> batch = {"image": np.arange(8).reshape(4, 2), "label": np.arange(4)}
    >>> shard_for_process(batch, process_index=1, process_count=2)["label"]
    array([2, 3])
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    leading_sizes = {key: len(value) for key, value in batch.items()}
    if len(set(leading_sizes.values())) != 1:
        raise ValueError(f"batch arrays must share one leading size, got {leading_sizes}")
    global_size = next(iter(leading_sizes.values()))
    if global_size % process_count:
        raise ValueError(
            f"global batch size {global_size} is not divisible by {process_count} processes"
        )
    per_process = global_size // process_count
    begin = process_index * per_process
    return {key: value[begin:begin + per_process] for key, value in batch.items()}
