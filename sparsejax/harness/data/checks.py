"""The checks every loaded example goes through before any training
(:func:`check_examples`): IDX files and TFDS data alike.
"""

from __future__ import annotations

import numpy as np

from sparsejax.harness.data.dataset import IMAGE_SHAPES, NUM_CLASSES

__all__ = ["check_examples"]


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
    shape = IMAGE_SHAPES.get(name)
    if shape is not None and tuple(images.shape[1:]) != shape:
        raise ValueError(f"{images_from}: images are {'x'.join(map(str, images.shape[1:]))}, "
                         f"a {name} image is {'x'.join(map(str, shape))}")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise ValueError(f"{images_from}: {int(np.size(images) - np.isfinite(images).sum())} "
                         "pixels are NaN or inf")
    classes = NUM_CLASSES[name]
    bad = labels[(labels < 0) | (labels >= classes)]
    if bad.size:
        raise ValueError(f"{labels_from}: label {bad[0]} is not a {name} class "
                         f"(0 to {classes - 1})")
