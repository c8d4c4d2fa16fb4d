"""Tests of sparsejax.harness.data: loading (IDX, TFDS, mnist1d) and resumable batching."""

import doctest
import gzip
import random
import socket
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from sparsejax.harness import data
from sparsejax.harness.data import (
    DATASET_NAMES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DataPosition,
    Dataset,
    DatasetNotAvailableError,
    epoch_permutation,
    load_dataset,
    random_crop_and_flip,
    read_idx,
    shard_for_process,
    steps_per_epoch,
    train_batches,
)

# ../shared beside the repository (CI has it); tests that need it skip without it.
REAL_MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
REAL_MNIST_TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(
        size.to_bytes(4, "big") for size in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


def write_fake_mnist(directory: Path, num_train: int = 12, num_test: int = 5) -> dict:
    """Writes the four IDX files (train ones gzipped, test ones raw); returns the arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (num_train, 28, 28), np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, num_train, np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, np.uint8),
    }
    for file_name, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
        write_file(directory / file_name, idx_bytes(magic, array))
    return arrays


def tiny_dataset(num_train: int = 23, image_shape: tuple[int, ...] = (1,)) -> Dataset:
    """Training image i is filled with the value i, so batches show which examples they hold."""
    train_images = np.broadcast_to(
        np.arange(num_train, dtype=np.float32).reshape((-1,) + (1,) * len(image_shape)),
        (num_train, *image_shape),
    ).copy()
    return Dataset(
        name="tiny",
        train_images=train_images,
        train_labels=np.arange(num_train, dtype=np.int32),
        test_images=np.zeros((7, *image_shape), np.float32),
        test_labels=np.arange(7, dtype=np.int32),
        num_classes=num_train,
    )


@pytest.fixture(scope="module")
def mnist1d() -> Dataset:
    return load_dataset("mnist1d", seed=0)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("file_name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_read_idx_raw_and_gzipped(tmp_path, file_name):
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    path = write_file(tmp_path / file_name, idx_bytes(IDX_LABELS_MAGIC, labels))
    np.testing.assert_array_equal(read_idx(path, IDX_LABELS_MAGIC), labels)


def test_read_idx_images_shape(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_file(tmp_path / "images-idx3-ubyte", idx_bytes(IDX_IMAGES_MAGIC, images))
    np.testing.assert_array_equal(read_idx(path, IDX_IMAGES_MAGIC), images)


@pytest.mark.parametrize(
    "content, message",
    [
        (idx_bytes(IDX_IMAGES_MAGIC, np.zeros(3)), "magic number is 2051, expected 2049"),
        (b"\x00\x00", "no magic number"),
        (IDX_LABELS_MAGIC.to_bytes(4, "big") + b"\x00\x00", "truncated IDX header"),
        (idx_bytes(IDX_LABELS_MAGIC, np.zeros(10))[:-3], "holds 7 bytes of data"),
        (idx_bytes(IDX_LABELS_MAGIC, np.zeros(10)) + b"\x00", "holds 11 bytes of data"),
    ],
    ids=["wrong-magic", "no-magic", "short-header", "truncated-data", "extra-data"],
)
def test_read_idx_rejects_corrupt_file_naming_it(tmp_path, content, message):
    path = write_file(tmp_path / "bad-labels-idx1-ubyte", content)
    with pytest.raises(ValueError, match=message) as raised:
        read_idx(path, IDX_LABELS_MAGIC)
    assert str(path) in str(raised.value)


def test_read_idx_rejects_truncated_gzip_naming_it(tmp_path):
    compressed = gzip.compress(idx_bytes(IDX_LABELS_MAGIC, np.zeros(100)))
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="gzip") as raised:
        read_idx(path, IDX_LABELS_MAGIC)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_idx_dataset(tmp_path, name):
    arrays = write_fake_mnist(tmp_path)
    dataset = load_dataset(name, tmp_path)
    assert dataset.name == name and dataset.num_classes == 10
    assert dataset.train_images.shape == (12, 28, 28, 1)
    assert dataset.test_images.shape == (5, 28, 28, 1)
    assert dataset.input_shape == (28, 28, 1)
    assert dataset.train_images.dtype == np.float32 and dataset.test_images.dtype == np.float32
    assert dataset.train_labels.dtype == np.int32 and dataset.test_labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.train_labels, arrays["train-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(dataset.test_labels, arrays["t10k-labels-idx1-ubyte"])
    mean, std = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}[name]
    expected = (arrays["t10k-images-idx3-ubyte"][..., None] / 255.0 - mean) / std
    np.testing.assert_allclose(dataset.test_images, expected, rtol=1e-5, atol=1e-5)


def test_load_idx_dataset_count_mismatch(tmp_path):
    write_fake_mnist(tmp_path)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte"
    write_file(labels_path, idx_bytes(IDX_LABELS_MAGIC, np.zeros(4)))
    with pytest.raises(ValueError, match="5 images but .*t10k-labels-idx1-ubyte holds 4"):
        load_dataset("mnist", tmp_path)


def test_load_idx_dataset_with_missing_files(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotAvailableError, match="not t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_real_mnist():
    if not (REAL_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"real MNIST IDX files are not in {REAL_MNIST_DIR}")
    dataset = load_dataset("mnist", REAL_MNIST_DIR)
    assert dataset.train_images.shape == (60000, 28, 28, 1)
    assert dataset.test_images.shape == (10000, 28, 28, 1)
    assert dataset.train_images.dtype == np.float32 and dataset.test_labels.dtype == np.int32
    assert np.bincount(dataset.test_labels).tolist() == REAL_MNIST_TEST_HISTOGRAM
    # The normalisation constants are MNIST's own statistics.
    assert abs(float(dataset.train_images.mean())) < 1e-2
    assert abs(float(dataset.train_images.std()) - 1.0) < 1e-2


# --------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize(
    "name, image_shape, num_classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_tfds_data_source_with_mock_data(tmp_path, name, image_shape, num_classes):
    # tfds 4.9.10's mock_data covers tfds.data_source (it mocks the array_record source),
    # but its mocked source lacks __getitems__, so sparsejax reads records one by one.
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        dataset = load_dataset(name, tmp_path)
        raw_test = list(tfds.data_source(name, split="test", data_dir=tmp_path, download=False))
    assert dataset.train_images.shape == (6, *image_shape)
    assert dataset.test_images.shape == (6, *image_shape)
    assert dataset.num_classes == num_classes
    assert dataset.train_images.dtype == np.float32 and dataset.train_labels.dtype == np.int32
    assert 0 <= dataset.train_labels.min() and dataset.train_labels.max() < num_classes
    mean, std = data.IMAGE_MEAN_STD[name]
    raw_images = np.stack([example["image"] for example in raw_test])
    expected = (raw_images / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(dataset.test_images, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dataset.test_labels, [example["label"] for example in raw_test])


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_tfds_dataset_gives_clear_error(tmp_path, name):
    with pytest.raises(DatasetNotAvailableError) as raised:
        load_dataset(name, tmp_path)
    message = str(raised.value)
    assert isinstance(raised.value, FileNotFoundError)
    assert repr(name) in message and str(tmp_path) in message and "download=True" in message
    assert ("IDX files" in message) == (name == "mnist")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'") as raised:
        load_dataset("imagenet")
    assert all(name in str(raised.value) for name in DATASET_NAMES)


# --------------------------------------------------------------------------- mnist1d


def test_mnist1d_shapes(mnist1d):
    assert mnist1d.name == "mnist1d" and mnist1d.num_classes == 10
    assert mnist1d.train_images.shape == (4000, 40, 1)
    assert mnist1d.test_images.shape == (1000, 40, 1)
    assert mnist1d.input_shape == (40, 1)
    assert mnist1d.train_images.dtype == np.float32 and mnist1d.train_labels.dtype == np.int32
    assert set(np.unique(mnist1d.train_labels).tolist()) == set(range(10))
    assert abs(float(mnist1d.train_images.mean())) < 0.1
    assert abs(float(mnist1d.train_images.std()) - 1.0) < 0.1


def test_mnist1d_is_deterministic_offline_and_leaves_global_rngs_alone(mnist1d, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d generation tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("SPARSEJAX_CACHE_DIR", "")  # generated, not read from a kept file
    random.seed(123)
    np.random.seed(123)
    expected_python_draw, expected_numpy_draw = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)

    again = load_dataset("mnist1d", seed=0)
    other_seed = load_dataset("mnist1d", seed=1)

    assert (random.random(), np.random.rand()) == (expected_python_draw, expected_numpy_draw)
    for array, same in zip(mnist1d, again, strict=True):
        np.testing.assert_array_equal(array, same)
    assert not np.array_equal(mnist1d.train_images, other_seed.train_images)


def test_mnist1d_is_kept_on_disk_read_back_bitwise_and_damaged_files_are_written_again(
        tmp_path, monkeypatch, caplog):
    """The first process generates a seed and keeps it; the next reads it back, bit for
    bit, without importing mnist1d; a truncated file, one whose bytes no longer match its
    digest, or one without a digest is generated again and rewritten; a folder that
    cannot be written, or no cache, still loads."""
    from sparsejax.harness.data import mnist1d as module

    monkeypatch.setenv("SPARSEJAX_CACHE_DIR", str(tmp_path / "cache"))
    module._generated_mnist1d.cache_clear()
    generated = module.generate_mnist1d(0)  # an empty folder: generated, then kept
    (kept,) = (tmp_path / "cache").iterdir()
    assert kept.name.startswith("mnist1d-") and kept.name.endswith("-seed0.npz")

    arrays = [generated.train_images, generated.train_labels, generated.test_images,
              generated.test_labels]
    generations = []
    monkeypatch.setattr(module, "_generate", lambda *a: generations.append(a) or [
        np.array(x) for x in arrays])
    monkeypatch.setattr(module, "require", lambda name: generations.append(name))

    def load() -> Dataset:
        module._generated_mnist1d.cache_clear()
        return module.generate_mnist1d(0)

    read = load()
    assert generations == []  # read back: neither the package nor its generator
    for array, same in zip(arrays, [read.train_images, read.train_labels, read.test_images,
                                    read.test_labels], strict=True):
        assert array.dtype == same.dtype and not same.flags.writeable
        np.testing.assert_array_equal(array, same)

    kept.write_bytes(kept.read_bytes()[:1000])  # a write cut short by a crash
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(load().train_images, generated.train_images)
    assert len(generations) == 2 and "unreadable" in caplog.text
    assert module._read(kept) is not None  # written again, whole

    with np.load(kept) as file:  # one signal value changed, the digest kept
        stored = {name: file[name] for name in file.files}
    stored["x"] = stored["x"].copy()
    stored["x"][7, 3, 0] += 1.0
    np.savez(kept, **stored)
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(load().train_images, generated.train_images)
    assert len(generations) == 4 and "does not hold what it should" in caplog.text

    np.savez(kept, x=np.zeros((3, 40, 1), np.float32), y=np.zeros(3, np.int32),
             x_test=np.zeros((3, 40, 1), np.float32), y_test=np.zeros(3, np.int32))
    np.testing.assert_array_equal(load().test_labels, generated.test_labels)
    assert len(generations) == 6 and module._read(kept) is not None

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SPARSEJAX_CACHE_DIR", str(blocked / "cache"))
    np.testing.assert_array_equal(load().train_labels, generated.train_labels)
    monkeypatch.setenv("SPARSEJAX_CACHE_DIR", "")
    assert module._cache_file(0) is None
    module._generated_mnist1d.cache_clear()


# --------------------------------------------------------------------------- batching


def test_epoch_permutation_keyed_by_seed_and_epoch():
    first = epoch_permutation(seed=3, epoch=0, num_examples=100)
    assert sorted(first.tolist()) == list(range(100))
    np.testing.assert_array_equal(first, epoch_permutation(3, 0, 100))
    assert not np.array_equal(first, epoch_permutation(3, 1, 100))
    assert not np.array_equal(first, epoch_permutation(4, 0, 100))


def test_data_position_arithmetic():
    assert steps_per_epoch(23, 4) == 5
    assert DataPosition.from_step(12, batches_per_epoch=5) == DataPosition(2, 2)
    assert DataPosition(1, 3).advance(5) == DataPosition(1, 4)
    assert DataPosition(1, 4).advance(5) == DataPosition(2, 0)


def assert_same_stream(stream, expected_stream):
    for (position, batch), (expected_position, expected_batch) in zip(
        stream, expected_stream, strict=True
    ):
        assert position == expected_position
        np.testing.assert_array_equal(batch["image"], expected_batch["image"])
        np.testing.assert_array_equal(batch["label"], expected_batch["label"])


def test_train_batches_epochs_drop_remainder_and_reshuffle():
    dataset = tiny_dataset(num_train=23)
    stream = list(islice(train_batches(dataset, batch_size=4, seed=0), 10))
    positions = [position for position, _ in stream]
    assert positions == [DataPosition(epoch, batch) for epoch in range(2) for batch in range(5)]
    for epoch in range(2):
        labels = np.concatenate([batch["label"] for _, batch in stream[5 * epoch:5 * epoch + 5]])
        np.testing.assert_array_equal(labels, epoch_permutation(0, epoch, 23)[:20])
    for _, batch in stream:
        assert batch["image"].shape == (4, 1)
        np.testing.assert_array_equal(batch["image"][:, 0], batch["label"])


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_resume_equals_uninterrupted_tail(augment):
    dataset = tiny_dataset(num_train=23, image_shape=(6, 6, 2))
    uninterrupted = list(islice(train_batches(dataset, 4, seed=7, augment=augment), 17))
    for step in range(17):
        start, _ = uninterrupted[step]
        resumed = train_batches(dataset, 4, seed=7, start=start, augment=augment)
        assert_same_stream(islice(resumed, 17 - step), uninterrupted[step:])


def test_train_batches_rejects_bad_arguments():
    dataset = tiny_dataset(num_train=23)
    with pytest.raises(ValueError, match="exceeds"):
        train_batches(dataset, batch_size=24, seed=0)
    with pytest.raises(ValueError, match="outside"):
        train_batches(dataset, batch_size=4, seed=0, start=DataPosition(0, 5))
    with pytest.raises(ValueError, match="NHWC"):
        train_batches(dataset, batch_size=4, seed=0, augment=True)


def test_augmentation_defaults_on_for_cifar_only():
    images = tiny_dataset(num_train=8, image_shape=(5, 5, 3))
    cifar_like = images._replace(name="cifar10")
    _, plain = next(train_batches(images, 8, seed=0))
    _, augmented = next(train_batches(cifar_like, 8, seed=0))
    np.testing.assert_array_equal(plain["label"], augmented["label"])
    np.testing.assert_array_equal(plain["image"], images.train_images[plain["label"]])
    assert not np.array_equal(plain["image"], augmented["image"])


def test_random_crop_and_flip_is_a_shifted_crop_or_its_mirror():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 5, 6, 2)).astype(np.float32)
    padding = 2
    augmented = random_crop_and_flip(images, np.random.default_rng(1), padding=padding)
    assert augmented.shape == images.shape and augmented.dtype == images.dtype
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    for image, result in zip(padded, augmented, strict=True):
        crops = [
            candidate
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            for crop in [image[top:top + 5, left:left + 6]]
            for candidate in (crop, crop[:, ::-1])
        ]
        assert any(np.array_equal(result, candidate) for candidate in crops)
    assert not np.array_equal(augmented, images)
    assert not np.array_equal(
        augmented, random_crop_and_flip(images, np.random.default_rng(2), padding=padding)
    )


def test_test_batches_in_order_with_partial_last_batch():
    dataset = tiny_dataset()
    batches = list(data.test_batches(dataset, batch_size=3))
    assert [len(batch["label"]) for batch in batches] == [3, 3, 1]
    np.testing.assert_array_equal(
        np.concatenate([batch["label"] for batch in batches]), dataset.test_labels
    )
    with pytest.raises(ValueError, match="positive"):
        next(data.test_batches(dataset, batch_size=0))


def test_shard_for_process():
    batch = {"image": np.arange(12).reshape(6, 2), "label": np.arange(6)}
    shards = [shard_for_process(batch, index, 3) for index in range(3)]
    for key in batch:
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), batch[key])
    np.testing.assert_array_equal(shards[1]["label"], [2, 3])
    with pytest.raises(ValueError, match="not divisible by 4"):
        shard_for_process(batch, 0, 4)
    with pytest.raises(ValueError, match="process_index 3"):
        shard_for_process(batch, 3, 3)
    with pytest.raises(ValueError, match="leading size"):
        shard_for_process({"image": np.zeros((6, 2)), "label": np.zeros(4)}, 0, 2)


def test_docstring_examples():
    results = doctest.testmod(data, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0
