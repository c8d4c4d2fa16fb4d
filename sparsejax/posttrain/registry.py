"""The post-training pruning algorithms by name, open like the training methods'
registry: ``sparsejax prune --method NAME``, :func:`~sparsejax.posttrain.prune_layer` and
the sequential driver reach every registered algorithm.

An algorithm prunes one kernel ``(in, out)`` from its calibration inputs ``X`` or from
``H = X^T X`` (what the sequential driver accumulates), in a sparsity pattern. Register
one with :func:`register_posttrain_method`; ``docs/examples/new_posttrain.py`` is a
worked example.

>>> sorted(POSTTRAIN_METHODS)
['magnitude', 'sparsegpt', 'wanda']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from sparsejax.core.patterns import Pattern, as_pattern

__all__ = ["PosttrainPruner", "POSTTRAIN_METHODS", "register_posttrain_method",
           "check_posttrain_method", "check_posttrain_pattern", "posttrain_pruner"]


def _every_pattern(pattern: Pattern, **options: Any) -> Pattern:
    del options
    return pattern


class PosttrainPruner(NamedTuple):
    """One post-training pruning algorithm.

    Attributes:
      from_inputs: ``(kernel, inputs, pattern, sparsity, **options) -> PrunedLayer``;
        ``inputs`` is ``(examples, in)`` (``None`` for a data-free algorithm).
      from_hessian: the same from ``H = X^T X`` in place of the inputs.
      check_pattern: ``(pattern, **options) -> pattern``, raising ``ValueError`` for a
        pattern (or options) the algorithm cannot prune in; every pattern by default.
    """

    from_inputs: Callable[..., Any]
    from_hessian: Callable[..., Any]
    check_pattern: Callable[..., Pattern] = _every_pattern


POSTTRAIN_METHODS: dict[str, PosttrainPruner] = {}
"""The registered algorithms by name (built in: ``magnitude``, ``wanda``, ``sparsegpt``)."""


def register_posttrain_method(name: str, pruner: PosttrainPruner) -> None:
    """Make ``pruner`` available by ``name`` to :func:`~sparsejax.posttrain.prune_layer`,
    the sequential driver and ``sparsejax prune``."""
    if name in POSTTRAIN_METHODS:
        raise ValueError(f"post-training method {name!r} is already registered")
    POSTTRAIN_METHODS[name] = pruner


def check_posttrain_method(method: str) -> None:
    """``ValueError`` unless ``method`` is a registered post-training method.

    >>> check_posttrain_method("obs")
    Traceback (most recent call last):
    ...
    ValueError: unknown post-training method 'obs'; known: magnitude, wanda, sparsegpt
    """
    if method not in POSTTRAIN_METHODS:
        raise ValueError(f"unknown post-training method {method!r}; known: "
                         f"{', '.join(POSTTRAIN_METHODS)}")


def posttrain_pruner(method: str) -> PosttrainPruner:
    """The registered algorithm ``method``; ``ValueError`` naming the known ones."""
    check_posttrain_method(method)
    return POSTTRAIN_METHODS[method]


def check_posttrain_pattern(method: str, pattern: str | Pattern, **options: Any) -> Pattern:
    """``pattern`` parsed, or ``ValueError`` when ``method`` cannot prune in it (with
    ``options``), by the algorithm's own ``check_pattern``: magnitude and Wanda take every
    pattern; SparseGPT only unstructured and N:M along the kernel's input axis, with a
    ``blocksize`` that is a multiple of ``M``. Checks no shapes.

    >>> check_posttrain_pattern("sparsegpt", "channel")
    Traceback (most recent call last):
    ...
    ValueError: sparsegpt supports the unstructured and N:M patterns, got channel
    """
    return posttrain_pruner(method).check_pattern(as_pattern(pattern), **options)
