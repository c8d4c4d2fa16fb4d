"""Score methods in a Flax NNX model of your own: the public path of
:mod:`sparsejax.integrations.nnx`, where the documentation lives.

>>> import sparsejax.nnx
>>> sparsejax.nnx.sparsify is sparsejax.integrations.nnx.sparsify
True
"""

from sparsejax.integrations.nnx import *  # noqa: F403
from sparsejax.integrations.nnx import __all__  # noqa: F401
