"""Checks for bad input, shared by every public entry point.

Each check raises a ``ValueError`` (or ``TypeError``) whose message names the problem,
so that a mistaken argument is caught at once instead of producing a silent wrong mask.
Checks only look at concrete (host) values; under ``jit`` a traced value is passed
through unchecked, and the traced paths that must still be checked (non-finite scores)
use :func:`check_finite_traced`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._tree import path_str

__all__ = [
    "check_density",
    "check_sparsity",
    "check_same_structure",
    "check_finite",
    "is_concrete",
]


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value on the host now (not a tracer inside ``jit``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def _check_fraction(value: Any, name: str) -> None:
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite and in [0, 1], got {value!r}")
    if np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def check_density(density: Any, name: str = "density") -> None:
    """Raise ``ValueError`` unless ``density`` (fraction kept) lies in [0, 1].

    >>> check_density(0.1)
    >>> check_density(1.5)
    Traceback (most recent call last):
    ...
    ValueError: density must lie in [0, 1], got 1.5
    """
    _check_fraction(density, name)


def check_sparsity(sparsity: Any, name: str = "sparsity") -> None:
    """Raise ``ValueError`` unless ``sparsity`` (fraction removed) lies in [0, 1).

    A sparsity of exactly 1 would remove every weight, which no method can train.

    >>> check_sparsity(0.9)
    >>> check_sparsity(1.0)
    Traceback (most recent call last):
    ...
    ValueError: sparsity must lie in [0, 1), got 1.0
    """
    _check_fraction(sparsity, name)
    if is_concrete(sparsity) and np.any(np.asarray(sparsity) >= 1):
        raise ValueError(f"{name} must lie in [0, 1), got {sparsity!r}")


def check_same_structure(
    reference: Any,
    other: Any,
    *,
    reference_name: str = "params",
    other_name: str = "masks",
    check_shapes: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``other`` has the tree structure (and leaf shapes) of
    ``reference``; the message names the first differing leaf path.

    >>> import jax.numpy as jnp
    >>> p = {"w": jnp.zeros((2, 3))}
    >>> check_same_structure(p, {"w": jnp.ones((2, 3), bool)})
    >>> check_same_structure(p, {"w": jnp.ones((3, 2), bool)})
    Traceback (most recent call last):
    ...
    ValueError: masks do not match params: leaf 'w' has shape (3, 2), expected (2, 3)
    """
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    other_leaves, other_def = jax.tree_util.tree_flatten_with_path(other)
    if ref_def != other_def:
        ref_paths = {path_str(p) for p, _ in ref_leaves}
        other_paths = {path_str(p) for p, _ in other_leaves}
        missing = sorted(ref_paths - other_paths)
        extra = sorted(other_paths - ref_paths)
        detail = []
        if missing:
            detail.append(f"missing leaves {missing[:5]}")
        if extra:
            detail.append(f"unexpected leaves {extra[:5]}")
        if not detail:
            detail.append(f"tree structure {other_def} differs from {ref_def}")
        raise ValueError(f"{other_name} do not match {reference_name}: " + "; ".join(detail))
    if not check_shapes:
        return
    for (path, ref_leaf), (_, other_leaf) in zip(ref_leaves, other_leaves, strict=True):
        ref_shape = tuple(np.shape(ref_leaf))
        other_shape = tuple(np.shape(other_leaf))
        if ref_shape != other_shape:
            raise ValueError(
                f"{other_name} do not match {reference_name}: leaf '{path_str(path)}' has "
                f"shape {other_shape}, expected {ref_shape}"
            )


def check_finite(tree: Any, name: str = "scores") -> None:
    """Raise ``ValueError`` naming the first leaf of ``tree`` that holds a NaN or inf.

    Concrete leaves are checked on the host; traced leaves are checked on the device
    through :func:`check_finite_traced`, whose error surfaces when the computation runs.

    >>> import jax.numpy as jnp
    >>> check_finite({"a": jnp.array([1.0, jnp.nan])})
    Traceback (most recent call last):
    ...
    ValueError: scores contain non-finite values (NaN or inf) in leaf 'a'
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if is_concrete(leaf):
            # On the host with numpy: jnp here would be traced when a concrete array is
            # closed over inside jit.
            if not np.all(np.isfinite(np.asarray(leaf).astype(np.float32))):
                raise ValueError(
                    f"{name} contain non-finite values (NaN or inf) in leaf '{path_str(path)}'"
                )
        else:
            check_finite_traced(leaf, f"{name} contain non-finite values (NaN or inf) in "
                                      f"leaf '{path_str(path)}'")


def check_finite_traced(x: jax.Array, message: str) -> None:
    """Under ``jit``: raise ``ValueError(message)`` on the host if ``x`` has a NaN or inf.

    The check is a device-side reduction plus a host callback of one boolean; the
    error reaches the caller as a runtime error that contains ``message``.
    """
    bad = jnp.logical_not(jnp.all(jnp.isfinite(x)))
    jax.debug.callback(_raise_if(message), bad)


def _raise_if(message: str) -> Callable[[Any], None]:
    def callback(bad: Any) -> None:
        if bool(bad):
            raise ValueError(message)

    return callback
