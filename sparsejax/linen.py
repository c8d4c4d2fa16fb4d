"""Score methods in a Flax linen model and TrainState of your own: the public path of
:mod:`sparsejax.integrations.linen`, where the documentation lives.

>>> import sparsejax.linen
>>> sparsejax.linen.sparsify is sparsejax.integrations.linen.sparsify
True
"""

from sparsejax.integrations.linen import *  # noqa: F403
from sparsejax.integrations.linen import __all__  # noqa: F401
