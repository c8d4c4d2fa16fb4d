"""Optional dependencies: import one, or say which extra installs it.

The core (``import sparsejax``, the methods, the optax forms) needs only jax, flax, optax,
orbax-checkpoint, chex and numpy. Datasets, plots, progress bars and TensorBoard events
come from extras; a caller who reaches one without its extra gets an ``ImportError``
naming the ``pip install`` line, not a bare ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (extra that installs it, what it is needed for)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorflow_datasets": ("data", "loading datasets through TFDS"),
    "mnist1d": ("data", "the MNIST-1D dataset"),
    "matplotlib": ("plots", "plots"),
    "tqdm": ("progress", "the progress bar"),
    "tensorboardX": ("tensorboard", "TensorBoard events"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` (a key of ``EXTRAS`` or a submodule of one), or raise an
    ``ImportError`` that names the extra to install.

    >>> require("numpy.linalg").__name__
    'numpy.linalg'
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if top not in EXTRAS or error.name not in (top, module):
            raise
        extra, purpose = EXTRAS[top]
        raise ImportError(
            f"{purpose} needs the optional package {top!r}, which is not installed: "
            f"pip install 'sparsejax[{extra}]' (or 'sparsejax[all]')") from error
