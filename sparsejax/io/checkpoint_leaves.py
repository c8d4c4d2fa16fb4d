"""Leaf handling of :mod:`sparsejax.io.checkpoint`: how each leaf of a state is described,
written through orbax and rebuilt on restore, and how a restore template is compared with
the stored description (the checks behind ``TemplateMismatchError``).

Orbax stores a flat dict ``{"leaf_00000": array, ...}`` in flattening order; the pytree
structure is not stored, so ``restore`` takes a template and checks it leaf by leaf.
PRNG key leaves are stored as their key data, zero-size leaves (which orbax cannot write)
are rebuilt from their description, numpy leaves come back as numpy and Python scalars as
Python scalars.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def describe(path: str, leaf: Any) -> dict[str, Any]:
    """Shape/dtype description of one leaf of a state or template."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        entry: dict[str, Any] = {"path": path, "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
        if is_key(leaf):
            data = jax.eval_shape(jax.random.key_data, leaf)
            entry["key_data_shape"] = list(data.shape)
            entry["key_data_dtype"] = str(data.dtype)
            if isinstance(leaf, jax.Array):
                entry["key_impl"] = str(jax.random.key_impl(leaf))
        return entry
    if isinstance(leaf, (np.ndarray, np.generic, bool, int, float, complex)):
        arr = np.asarray(leaf)
        return {"path": path, "shape": list(arr.shape), "dtype": str(arr.dtype)}
    raise TypeError(
        f"checkpoint: unsupported leaf type {type(leaf).__name__} at {path or '<root>'}; "
        "leaves must be jax/numpy arrays or Python scalars"
    )


def flatten(tree: PyTree) -> tuple[list[Any], list[dict[str, Any]], Any]:
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in path_leaves]
    entries = [describe(jax.tree_util.keystr(p), leaf) for p, leaf in path_leaves]
    return leaves, entries, treedef


def leaf_name(i: int) -> str:
    return f"leaf_{i:05d}"


def saveable(leaf: Any) -> Any:
    """The array orbax writes for one state leaf."""
    if isinstance(leaf, jax.Array):
        return jax.random.key_data(leaf) if is_key(leaf) else leaf
    return np.asarray(leaf)


def default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def restore_target(leaf: Any, entry: dict[str, Any]) -> Any:
    """What orbax should restore one template leaf as.

    Real ``np.ndarray``s restore as numpy (keeping 64-bit dtypes); everything jax restores
    as a ``jax.Array`` placed with the template leaf's sharding. This is the one place a
    different device layout plugs in: give template leaves the target shardings.
    """
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None) or default_sharding()
        if is_key(leaf):
            shape, dtype = entry["key_data_shape"], entry["key_data_dtype"]
            return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if isinstance(leaf, np.ndarray):
        return leaf
    return np.asarray(leaf)


def finish_leaf(template_leaf: Any, entry: dict[str, Any], value: Any) -> Any:
    """Turn the array orbax returned (``None`` for zero-size leaves) into the leaf's type."""
    if isinstance(template_leaf, (jax.Array, jax.ShapeDtypeStruct)):
        if value is None:  # zero-size: nothing was written, rebuild from the description
            target = restore_target(template_leaf, entry)
            value = jax.device_put(jnp.zeros(target.shape, target.dtype), target.sharding)
        if is_key(template_leaf):
            return jax.random.wrap_key_data(value, impl=entry["key_impl"])
        return value
    if value is None:
        value = np.zeros(entry["shape"], np.dtype(entry["dtype"]))
    if isinstance(template_leaf, np.ndarray):
        return np.asarray(value)
    if isinstance(template_leaf, np.generic):
        return np.asarray(value)[()]
    return np.asarray(value).item()  # Python scalar


def compare(stored: list[dict[str, Any]], template: list[dict[str, Any]]) -> list[str]:
    """Human-readable differences between stored and template leaf descriptions."""
    problems: list[str] = []
    stored_by_path = {e["path"]: e for e in stored}
    template_by_path = {e["path"]: e for e in template}
    missing = [p for p in stored_by_path if p not in template_by_path]
    extra = [p for p in template_by_path if p not in stored_by_path]
    if missing:
        problems.append(f"in checkpoint but not in template: {some(missing)}")
    if extra:
        problems.append(f"in template but not in checkpoint: {some(extra)}")
    for path, s in stored_by_path.items():
        t = template_by_path.get(path)
        if t is None:
            continue
        if s["shape"] != t["shape"]:
            problems.append(
                f"shape of {path}: checkpoint {tuple(s['shape'])}, template {tuple(t['shape'])}"
            )
        if s["dtype"] != t["dtype"]:
            problems.append(f"dtype of {path}: checkpoint {s['dtype']}, template {t['dtype']}")
    if not problems and [e["path"] for e in stored] != [e["path"] for e in template]:
        problems.append("leaves are in a different order (different pytree node types?)")
    return problems


def some(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def save_items(tree: PyTree) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The flat dict orbax writes for ``tree`` and the description of every leaf."""
    leaves, entries, _ = flatten(tree)
    for leaf, entry in zip(leaves, entries, strict=True):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(f"cannot save an abstract leaf (ShapeDtypeStruct) at {entry['path']}")
    items = {leaf_name(i): saveable(leaf)
             for i, (leaf, entry) in enumerate(zip(leaves, entries, strict=True))
             if int(np.prod(entry["shape"])) > 0}  # orbax cannot write zero-size arrays
    return items, entries


def restore_targets(template: PyTree, stored: list[dict[str, Any]]) -> dict[str, Any]:
    """What orbax should read for each stored non-empty leaf, shaped by ``template``."""
    leaves = jax.tree_util.tree_leaves(template)
    return {leaf_name(i): restore_target(leaf, entry)
            for i, (leaf, entry) in enumerate(zip(leaves, stored, strict=True))
            if int(np.prod(entry["shape"])) > 0}


def rebuild(template: PyTree, stored: list[dict[str, Any]], restored: dict[str, Any]) -> PyTree:
    """The restored state in ``template``'s structure from orbax's flat dict."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    out = [finish_leaf(leaf, entry, restored.get(leaf_name(i)))
           for i, (leaf, entry) in enumerate(zip(leaves, stored, strict=True))]
    return jax.tree_util.tree_unflatten(treedef, out)
