"""Mask pytrees: which leaves are prunable, applying masks, counting, and reporting.

A mask tree has exactly the structure and leaf shapes of the params tree it masks and
holds ``bool`` arrays; leaves that are not pruned (biases, norms, or anything the
``prunable`` filter rejects) carry an all-``True`` mask. There are no ``None`` leaves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import map_with_path, path_str
from sparsejax.core.validation import check_binary_masks, check_same_structure

__all__ = [
    "Prunable",
    "default_prunable",
    "prunable_except",
    "prunable_leaves",
    "dense_masks",
    "apply_masks",
    "count_kept",
    "count_total",
    "leaf_densities",
    "overall_density",
    "LayerSparsity",
    "sparsity_report",
    "format_sparsity_report",
]

Prunable = Callable[[str, Any], bool]
"""A filter ``prunable(path, leaf) -> bool``; ``path`` is slash-separated, e.g.
``'Dense_0/kernel'``."""

_NEVER_PRUNED_NAMES = frozenset({"bias", "scale", "mean", "var", "embedding"})


def default_prunable(path: str, leaf: Any) -> bool:
    """The default filter: weight tensors with ``ndim >= 2`` (Dense and Conv kernels).

    Biases, norm scales/offsets, batch statistics and embedding tables stay dense.

    >>> import jax.numpy as jnp
    >>> default_prunable("Dense_0/kernel", jnp.zeros((3, 4)))
    True
    >>> default_prunable("Dense_0/bias", jnp.zeros((4,)))
    False
    """
    name = path.rsplit("/", 1)[-1]
    return np.ndim(leaf) >= 2 and name not in _NEVER_PRUNED_NAMES


def prunable_except(*patterns: str, base: Prunable = default_prunable) -> Prunable:
    """A filter like ``base`` that also keeps dense every path matching a regex pattern.

    Use it to leave the first or last layer dense:

    >>> import jax.numpy as jnp
    >>> keep_last_dense = prunable_except(r"^Dense_2/")
    >>> keep_last_dense("Dense_2/kernel", jnp.zeros((3, 4)))
    False
    >>> keep_last_dense("Dense_0/kernel", jnp.zeros((3, 4)))
    True
    """
    compiled = [re.compile(p) for p in patterns]

    def prunable(path: str, leaf: Any) -> bool:
        return base(path, leaf) and not any(c.search(path) for c in compiled)

    return prunable


def prunable_leaves(params: Any, prunable: Prunable = default_prunable) -> Any:
    """A tree of Python bools, the structure of ``params``: which leaves are pruned.

    >>> import jax.numpy as jnp
    >>> prunable_leaves({"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
    {'b': False, 'w': True}
    """
    return map_with_path(lambda path, leaf: bool(prunable(path, leaf)), params)


def dense_masks(params: Any) -> Any:
    """All-``True`` boolean masks with the structure and shapes of ``params``.

    >>> import jax.numpy as jnp
    >>> dense_masks({"w": jnp.zeros((2, 2))})["w"].dtype
    dtype('bool')
    """
    return jax.tree_util.tree_map(lambda p: jnp.ones(jnp.shape(p), dtype=bool), params)


def apply_masks(params: Any, masks: Any) -> Any:
    """Zero the entries of ``params`` where ``masks`` is ``False``.

    Raises ``ValueError`` if the mask tree's structure or shapes differ from ``params``,
    or if a concrete mask is neither ``bool`` nor only 0s and 1s (a 0.5 or NaN would be
    read as "kept"). Under ``jit`` a traced mask's values cannot be checked and a
    non-``bool`` one is used as ``mask != 0``: pass ``bool`` masks there.

    >>> import jax.numpy as jnp
    >>> apply_masks({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])})["w"]
    Array([1., 0.], dtype=float32)
    """
    check_same_structure(params, masks)
    check_binary_masks(masks)
    return jax.tree_util.tree_map(
        lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.result_type(p))), params, masks
    )


def count_kept(masks: Any, prunable_tree: Any | None = None) -> jax.Array:
    """Number of ``True`` entries over all leaves (only prunable ones when
    ``prunable_tree`` from :func:`prunable_leaves` is given), as an int32 scalar.

    >>> import jax.numpy as jnp
    >>> int(count_kept({"a": jnp.array([True, False, True])}))
    2
    """
    leaves = _selected_leaves(masks, prunable_tree)
    return sum((jnp.sum(m, dtype=jnp.int32) for m in leaves), jnp.int32(0))


def count_total(masks: Any, prunable_tree: Any | None = None) -> int:
    """Number of entries over all (or only prunable) leaves, a Python int."""
    return int(sum(int(np.size(m)) for m in _selected_leaves(masks, prunable_tree)))


def leaf_densities(masks: Any) -> Any:
    """Fraction of ``True`` entries per leaf, a tree of float32 scalars.

    >>> import jax.numpy as jnp
    >>> float(leaf_densities({"a": jnp.array([True, False, False, False])})["a"])
    0.25
    """
    return jax.tree_util.tree_map(lambda m: jnp.mean(m.astype(jnp.float32)), masks)


def overall_density(masks: Any, prunable_tree: Any | None = None) -> jax.Array:
    """Fraction of ``True`` entries over all (or only prunable) leaves.

    >>> import jax.numpy as jnp
    >>> m = {"a": jnp.array([True, False]), "b": jnp.array([True, True])}
    >>> float(overall_density(m))
    0.75
    """
    total = count_total(masks, prunable_tree)
    if total == 0:
        return jnp.float32(1.0)
    return count_kept(masks, prunable_tree).astype(jnp.float32) / total


def _selected_leaves(masks: Any, prunable_tree: Any | None) -> list[Any]:
    leaves = jax.tree_util.tree_leaves(masks)
    if prunable_tree is None:
        return leaves
    check_same_structure(masks, prunable_tree, reference_name="masks",
                         other_name="prunable tree", check_shapes=False)
    selected = jax.tree_util.tree_leaves(prunable_tree)
    return [m for m, keep in zip(leaves, selected, strict=True) if keep]


class LayerSparsity(NamedTuple):
    """One row of a sparsity report."""

    path: str
    shape: tuple[int, ...]
    size: int
    kept: int
    density: float
    sparsity: float
    prunable: bool


def sparsity_report(
    params: Any, masks: Any | None = None, prunable: Prunable = default_prunable
) -> list[LayerSparsity]:
    """Per-leaf table of kept weights, measured on the effective model.

    An entry counts as kept when its mask is ``True`` and, with no masks given, when it
    is non-zero: the report measures what the model actually uses. The last row, with
    path ``'total (prunable)'``, sums over prunable leaves.

    >>> import jax.numpy as jnp
    >>> rows = sparsity_report({"w": jnp.array([[1.0, 0.0], [2.0, 3.0]])})
    >>> rows[-1].kept, rows[-1].sparsity
    (3, 0.25)
    """
    if masks is not None:
        check_same_structure(params, masks)
    else:
        masks = params
    rows = []
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_masks = jax.tree_util.tree_leaves(masks)
    for (path, leaf), mask in zip(flat_params, flat_masks, strict=True):
        name = path_str(path)
        alive = np.asarray(mask).astype(bool) & (np.asarray(leaf) != 0)
        size = int(np.size(leaf))
        kept = int(alive.sum())
        density = kept / size if size else 1.0
        rows.append(
            LayerSparsity(name, tuple(np.shape(leaf)), size, kept, density, 1.0 - density,
                          bool(prunable(name, leaf)))
        )
    total = sum(r.size for r in rows if r.prunable)
    kept = sum(r.kept for r in rows if r.prunable)
    density = kept / total if total else 1.0
    rows.append(LayerSparsity("total (prunable)", (), total, kept, density, 1.0 - density, True))
    return rows


def format_sparsity_report(rows: Sequence[LayerSparsity]) -> str:
    """The rows of :func:`sparsity_report` as an aligned text table."""
    header = ("leaf", "shape", "size", "kept", "density", "pruned")
    lines = [
        (r.path, "x".join(map(str, r.shape)) or "-", str(r.size), str(r.kept),
         f"{r.density:.4f}", "yes" if r.prunable else "no")
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header)] + [fmt.format(*line) for line in lines])
