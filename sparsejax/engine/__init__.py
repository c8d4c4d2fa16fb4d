"""The native engine: a method's jitted train step, on one device or data-parallel.

:func:`make_train_step` is the step :func:`sparsejax.harness.training.loop.train` runs;
:mod:`sparsejax.engine.parallel` wraps the same step for ``pmap`` and sharded ``jit``.
"""

from sparsejax.engine.step import LossFn, make_train_step, stateless_loss

__all__ = ["LossFn", "make_train_step", "stateless_loss"]
