"""``mnist1d``, generated locally by the ``mnist1d`` package from a seed (4000 train / 1000
test examples), once per seed in a process (:func:`generate_mnist1d`).
"""

from __future__ import annotations

import functools
import random
from types import ModuleType

import numpy as np

from sparsejax.harness._extras import require
from sparsejax.harness.data.dataset import NUM_CLASSES, Dataset

__all__ = ["generate_mnist1d"]


def generate_mnist1d(seed: int) -> Dataset:
    """The ``mnist1d`` dataset generated from ``seed`` (arrays read-only, cached per seed)."""
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
    return Dataset("mnist1d", *arrays, num_classes=NUM_CLASSES["mnist1d"])
