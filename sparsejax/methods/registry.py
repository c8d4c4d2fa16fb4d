"""The registry of methods by name, for the command line and experiment configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from sparsejax.methods.base import Method

__all__ = ["METHODS", "MethodBuilder", "register_method", "get_method"]

MethodBuilder = Callable[..., Method]
"""``builder(optimizer, **options) -> Method``."""

METHODS: dict[str, MethodBuilder] = {}


def register_method(name: str, builder: MethodBuilder) -> None:
    """Make ``builder(optimizer, **options)`` available as ``get_method(name, ...)``."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = builder


def get_method(name: str, optimizer: optax.GradientTransformation, **options: Any) -> Method:
    """Build the registered method ``name``.

    >>> import optax
    >>> get_method("dense", optax.sgd(0.1)).name
    'dense'
    >>> get_method("densest", optax.sgd(0.1))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown method 'densest'; known methods: ..., dense, ...
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](optimizer, **options)

