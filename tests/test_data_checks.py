"""TFDS data gets the checks IDX files get, before any training (issue #34): label range,
the dataset's image shape, finite pixels, empty splits, integer labels."""

import numpy as np
import pytest

from sparsejax.harness.data import load_dataset
from sparsejax.harness.data import tfds as data


def _examples(n, shape=(28, 28, 1), label=3, dtype=np.uint8):
    return [{"image": np.zeros(shape, dtype), "label": label} for _ in range(n)]


def _load_with(monkeypatch, train, test, name="mnist"):
    # What tfds.data_source would hand back: sequences of {"image", "label"} records.
    monkeypatch.setattr(data, "tfds_sources", lambda *args, **kwargs: [train, test])
    return load_dataset(name, "/nonexistent-so-tfds-is-asked")


def test_good_tfds_records_load(monkeypatch):
    dataset = _load_with(monkeypatch, _examples(4), _examples(2))
    assert dataset.train_images.shape == (4, 28, 28, 1) and dataset.test_labels.tolist() == [3, 3]


@pytest.mark.parametrize(("train", "test", "message"), [
    (_examples(4, label=-1), _examples(2), r"TFDS mnist train split: label -1 is not a mnist "
                                           r"class \(0 to 9\)"),
    (_examples(4), _examples(2, label=37), r"TFDS mnist test split: label 37 is not a mnist"),
    (_examples(4, shape=(32, 32, 3)), _examples(2, shape=(32, 32, 3)),
     r"TFDS mnist train split: images are 32x32x3, a mnist image is 28x28x1"),
    (_examples(4), [{"image": np.full((28, 28, 1), np.nan, np.float32), "label": 1}],
     r"TFDS mnist test split: 784 pixels are NaN or inf"),
    (_examples(4), [], r"TFDS mnist test split: holds 0 examples \(an empty split\)"),
    (_examples(4, label="three"), _examples(2),
     r"TFDS mnist train split: labels must be integer class ids"),
    (_examples(2) + _examples(1, shape=(14, 14, 1)), _examples(2),
     r"TFDS mnist train split: images of several shapes"),
])
def test_bad_tfds_records_are_refused_naming_the_split(monkeypatch, train, test, message):
    with pytest.raises(ValueError, match=message):
        _load_with(monkeypatch, train, test)


def test_nm_unpack_refuses_positions_out_of_range():
    import dataclasses

    import jax.numpy as jnp

    from sparsejax.io.export import nm_pack, nm_unpack

    packed = nm_pack(jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]]), "2:4")
    with pytest.raises(ValueError, match=r"positions must lie in 0\.\.3 for pattern 2:4"):
        nm_unpack(dataclasses.replace(packed, positions=packed.positions + 7))


def test_nm_pack_under_jit_checks_through_checkify():
    import jax
    import jax.numpy as jnp
    from jax.experimental import checkify

    from sparsejax.io.export import nm_pack

    kernel = jnp.array([[1.0, 2.0], [3.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    error, _ = checkify.checkify(jax.jit(lambda k: nm_pack(k, "2:4").values))(kernel)
    assert "keeps more than 2 entries" in error.get()
