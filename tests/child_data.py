"""MNIST-1D for the CLI child processes that the tests start, generated once per test
process instead of once per child.

A child run (tests/slow_cli.py, tests/multiprocess_worker.py) would import the ``mnist1d``
package (with matplotlib) and generate the dataset again from its seed: about 2.5 s of
Python before its first step, in every child. The test process has usually generated the
same seed already (``generate_mnist1d`` keeps it), and the result is the same arrays
(tests/test_data.py checks that generating is deterministic).

* :func:`child_env` (in the test process) saves ``mnist1d``'s output for :data:`SEED` to a
  file once, and returns the environment variable that names it.
* :func:`install` (first thing in a child, where that variable is set) puts a stand-in for
  the ``mnist1d.data`` module in ``sys.modules`` that returns the saved arrays for that
  seed (and defers to the real package for any other). The child still loads the data
  through sparsejax's own code (``sparsejax.harness.data.mnist1d``: the float32 casts,
  the read-only arrays, the restored random states).
"""

import atexit
import importlib
import os
import shutil
import sys
import tempfile
import types

import numpy as np

ENV = "SPARSEJAX_TEST_MNIST1D"
SEED = 0  # the CLI's default --seed
_SAVED: list[str] = []


def child_env() -> dict[str, str]:
    """``{ENV: file}``: the file holds what ``mnist1d.data.make_dataset`` returns for
    :data:`SEED` (the arrays sparsejax keeps of it), written once per process."""
    if not _SAVED:
        from sparsejax.harness.data.mnist1d import generate_mnist1d

        data = generate_mnist1d(SEED)
        folder = tempfile.mkdtemp(prefix="sparsejax-tests-mnist1d-")
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, f"mnist1d_seed{SEED}.npz")
        np.savez(path, seed=SEED, x=data.train_images[..., 0], y=data.train_labels,
                 x_test=data.test_images[..., 0], y_test=data.test_labels)
        _SAVED.append(path)
    return {ENV: _SAVED[0]}


def install() -> None:
    """In a child: answer ``mnist1d.data`` for :data:`SEED` from the file that
    :func:`child_env` names (nothing if the variable is not set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    with np.load(path) as file:
        saved = {key: file[key] for key in file.files}
    seed = int(saved.pop("seed"))
    stand_in = types.ModuleType("mnist1d.data")

    def get_dataset_args():
        return types.SimpleNamespace(seed=None)

    def make_dataset(args):
        if args.seed == seed:
            return dict(saved)
        del sys.modules["mnist1d.data"]  # another seed: the real package generates it
        real = importlib.import_module("mnist1d.data")
        real_args = real.get_dataset_args()
        real_args.seed = args.seed
        return real.make_dataset(real_args)

    stand_in.get_dataset_args = get_dataset_args
    stand_in.make_dataset = make_dataset
    sys.modules["mnist1d.data"] = stand_in
