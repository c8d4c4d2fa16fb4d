"""MNIST-1D for the CLI child processes that the tests start, generated once per run.

sparsejax keeps a generated MNIST-1D on disk (``SPARSEJAX_CACHE_DIR``; ``conftest.py``
points it at a fresh folder of the run, which every worker and child inherits).
:func:`child_env` makes sure the default seed is there before a child starts, so that the
child reads it instead of importing ``mnist1d`` (with matplotlib) and generating it again
(about 2.5 s of Python before its first step, in every child).
"""

import os

SEED = 0  # the CLI's default --seed


def child_env() -> dict[str, str]:
    """The environment that lets a child read this run's MNIST-1D for :data:`SEED`
    (generated here first if no process of the run has yet)."""
    from sparsejax.harness.data.mnist1d import CACHE_ENV, generate_mnist1d

    generate_mnist1d(SEED)
    return {CACHE_ENV: os.environ.get(CACHE_ENV, "")}
