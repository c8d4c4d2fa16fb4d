"""Checks for bad input, shared by every public entry point.

Each check raises a ``ValueError`` (or ``TypeError``) whose message names the problem,
so that a mistaken argument is caught at once instead of producing a silent wrong mask.
Tree structures and shapes are checked while tracing, so they cost a jitted step nothing.
Value checks only look at concrete (host) values; under ``jit`` a traced value is passed
through unchecked, and the traced paths that must still be checked (non-finite scores)
use :func:`check_finite_traced`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import path_str

__all__ = [
    "check_density",
    "check_sparsity",
    "check_same_structure",
    "check_grads",
    "check_finite",
    "as_key",
    "check_binary_masks",
    "check_int",
    "check_finite_number",
    "check_local_path",
    "check_writable_folder",
    "check_writable_file",
    "is_concrete",
    "is_int",
]


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value on the host now (not a tracer inside ``jit``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def _check_fraction(value: Any, name: str, interval: str = "[0, 1]") -> None:
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite and in {interval}, got {value!r}")
    if np.any(arr < 0) or np.any(arr > 1):
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


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
    _check_fraction(sparsity, name, "[0, 1)")
    if is_concrete(sparsity) and np.any(np.asarray(sparsity) >= 1):
        raise ValueError(f"{name} must lie in [0, 1), got {sparsity!r}")


def is_int(value: Any) -> bool:
    """True for a Python or numpy integer (not a ``bool``, not a float like ``2.0``)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(value: Any, name: str, *, minimum: int | None = None,
              maximum: int | None = None) -> None:
    """Raise unless ``value`` is an integer in ``[minimum, maximum]`` (``TypeError`` for a
    float or bool: ``2.5`` steps must not silently act like 2 or 3).

    >>> check_int(3, "update_every", minimum=1)
    >>> check_int(2.5, "update_every", minimum=1)
    Traceback (most recent call last):
    ...
    TypeError: update_every must be an integer >= 1, got 2.5
    """
    if minimum is not None and maximum is not None:
        wanted = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        wanted = f"an integer >= {minimum}"
    elif maximum is not None:
        wanted = f"an integer <= {maximum}"
    else:
        wanted = "an integer"
    if not is_int(value):
        raise TypeError(f"{name} must be {wanted}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def check_finite_number(value: Any, name: str) -> None:
    """Raise unless ``value`` is a finite real number (not NaN or inf).

    >>> check_finite_number(float("nan"), "--momentum")
    Traceback (most recent call last):
    ...
    ValueError: --momentum must be a finite number, got nan
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_local_path(path: str | os.PathLike[str], name: str) -> None:
    """Raise ``ValueError`` if ``path`` is a URL (``gs://...``): sparsejax writes runs and
    checkpoints to local or mounted shared folders only, and ``pathlib`` would silently
    turn the URL into a local path.

    >>> check_local_path("gs://bucket/run", "--out")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --out gs://bucket/run: only local or mounted shared folders are supported, ...
    """
    if "://" in str(path):
        raise ValueError(f"{name} {path}: only local or mounted shared folders are supported, "
                         "not URLs (gs://, s3://, ...)")


def _check_creatable(path: Path, start: Path, name: str, what: str) -> None:
    """Raise ``ValueError`` unless ``path`` (whose nearest folder is ``start`` or above)
    can be created: no part of it is a regular file, and the nearest existing folder is
    writable."""
    existing = start
    while not existing.exists():  # the nearest part of the path that exists
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{name} {path} cannot be created: {existing} is a file, not a folder")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        place = what if existing == path else f"cannot be created in {existing}"
        raise ValueError(f"{name} {path} {place} (permission denied)")


def check_writable_folder(path: str | os.PathLike[str], name: str = "--out") -> None:
    """Raise ``ValueError`` unless ``path`` is a folder, or can be created as one, that
    this process may write in: the message names the path and the file or folder in the
    way. Checked before any work starts, so a run does not fail at its first write.
    """
    check_local_path(path, name)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file, not a folder")
    _check_creatable(path, path, name, "is not writable")


def check_writable_file(path: str | os.PathLike[str], name: str = "--output") -> None:
    """Raise ``ValueError`` unless the file ``path`` can be written: it is not a folder,
    and its folder exists or can be created (no part of it is a regular file). The
    message names ``path`` and what is in the way (``[Errno 17] File exists`` before)."""
    check_local_path(path, name)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder, not a file")
    _check_creatable(path, path.parent, name, "cannot be created")


def as_key(seed: Any, name: str = "seed") -> jax.Array:
    """A PRNG key from ``seed``: an int (``jax.random.PRNGKey(seed)``) or a key already
    (a ``uint32`` array of shape ``(2,)``, or a typed key). Anything else is a
    ``ValueError`` naming ``name``.

    >>> as_key(3).shape
    (2,)
    >>> as_key("abc", "rng")
    Traceback (most recent call last):
    ...
    ValueError: rng must be an int or a PRNG key (jax.random.PRNGKey(0)), got 'abc'
    """
    from sparsejax.io.checkpoint_leaves import is_key

    if is_int(seed):
        return jax.random.PRNGKey(int(seed))
    if is_key(seed):
        return seed
    if isinstance(seed, (jax.Array, np.ndarray)) and seed.shape == (2,) and \
            seed.dtype == np.uint32:
        return jnp.asarray(seed)
    raise ValueError(f"{name} must be an int or a PRNG key (jax.random.PRNGKey(0)), got "
                     f"{seed!r}")


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
            detail.append(f"missing leaves {_some(missing)}")
        if extra:
            detail.append(f"unexpected leaves {_some(extra)}")
        if detail:
            detail[-1] += (f" ({reference_name}: {_leaves(len(ref_leaves))}, {other_name}: "
                           f"{_leaves(len(other_leaves))})")
        else:  # the same paths in other containers (a dict for a tuple, an NNX State...)
            detail.append(f"{other_name} have tree structure {other_def}, {reference_name} "
                          f"have {ref_def}")
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


def _leaves(n: int) -> str:
    return "1 leaf" if n == 1 else f"{n} leaves"


def _some(paths: list[str], shown: int = 5) -> str:
    if len(paths) <= shown:
        return str(paths)
    return f"{paths[:shown]} and {len(paths) - shown} more"


def check_grads(trainables: Any, grads: Any) -> None:
    """Raise ``ValueError`` unless ``grads`` has the tree structure and leaf shapes of
    ``trainables`` (what a method's ``update`` differentiates); the message names the
    leaf paths one has and the other lacks.

    Runs while ``update`` is traced (structure and shapes are static), so a jitted step
    pays nothing for it.

    >>> import jax.numpy as jnp
    >>> t = {"Dense_0": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
    >>> check_grads(t, {"Dense_0": {"kernel": jnp.zeros((2, 3))}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: grads do not match trainables: missing leaves ['Dense_0/bias'] (trainables: ...
    """
    check_same_structure(trainables, grads, reference_name="trainables", other_name="grads")


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


def check_binary_masks(masks: Any) -> None:
    """Raise ``ValueError`` naming the first mask leaf that is neither ``bool`` nor only
    0s and 1s (a 0.5 or a NaN would otherwise be read as "kept").

    Checked on the host for concrete arrays; a traced mask under ``jit`` is not checked
    (it is used as ``mask != 0``): pass ``bool`` masks there.

    >>> import jax.numpy as jnp
    >>> check_binary_masks({"w": jnp.array([True, False]), "v": jnp.array([0.0, 1.0])})
    >>> check_binary_masks({"w": jnp.array([1.0, 0.5])})
    Traceback (most recent call last):
    ...
    ValueError: masks must be bool or hold only 0 and 1: leaf 'w' holds 0.5
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(masks)[0]:
        if jnp.result_type(leaf) == jnp.bool_ or not is_concrete(leaf):
            continue
        values = np.asarray(leaf)
        bad = ~((values == 0) | (values == 1))
        if np.any(bad):
            raise ValueError(f"masks must be bool or hold only 0 and 1: leaf "
                             f"'{path_str(path)}' holds {values[bad].flat[0].item()}")


def check_finite_traced(x: jax.Array, message: str) -> None:
    """Under ``jit``: a ``checkify`` check that ``x`` holds no NaN or inf, reported as
    ``message`` when the caller opts in with :func:`jax.experimental.checkify.checkify`;
    otherwise nothing is added to the program.

    Not a host callback: JAX puts host callbacks into the persistent compilation cache's
    key, so a program holding one never hits the cache, and every mask-deciding program
    would pay its compile on every run. Concrete arrays are checked on the host before
    any program runs (:func:`check_finite`), which is where an eager call and the CLI
    report bad scores.

    >>> import jax, jax.numpy as jnp
    >>> from jax.experimental import checkify
    >>> def f(x):
    ...     check_finite_traced(x, "x holds NaN or inf")
    ...     return x * 2
    >>> error, _ = checkify.checkify(jax.jit(f))(jnp.array([1.0, jnp.nan]))
    >>> error.get()
    'x holds NaN or inf (`check` failed)'
    """
    check_traced(jnp.all(jnp.isfinite(x)), message)


def check_traced(ok: jax.Array, message: str) -> None:
    """A check inside traced code: ``checkify.debug_check(ok, message)``, which reports
    ``message`` where ``ok`` is False when the caller runs the program under
    :func:`jax.experimental.checkify.checkify`, and adds nothing to it otherwise (see
    :func:`check_finite_traced` for why not a host callback)."""
    from jax.experimental import checkify

    checkify.debug_check(ok, message)
