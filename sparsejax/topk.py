"""Exact top-k masks without sorting.

``topk_mask`` keeps exactly ``num_kept(density, size)`` entries with the largest scores,
per leaf or jointly across leaves. It finds the k-th largest score exactly by a bitwise
binary search over an order-preserving integer image of the float32 scores: 32 passes
that each count the scores above a candidate, which is linear in the number of scores
and much faster than ``jnp.sort`` or ``lax.top_k`` on CPU (see docs/design.md). Ties at
the threshold are broken deterministically: the entries that come first (in leaf order,
then row-major order) are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.validation import check_density, check_finite, check_same_structure, is_concrete

__all__ = ["num_kept", "topk_mask", "kth_largest"]

Scope = Literal["layer", "global"]

_SIGN_BIT = 0x80000000


def num_kept(density: Any, size: int) -> Any:
    """How many of ``size`` entries a ``density`` keeps: ``floor(density * size + 0.5)``.

    This is the one rounding rule of the library (round half up). With a Python float it
    returns a Python int computed in double precision; with a traced density an int32.

    >>> num_kept(0.5, 5), num_kept(0.1, 235200)
    (3, 23520)
    """
    if is_concrete(density) and not isinstance(density, jax.Array):
        return int(min(size, max(0, math.floor(float(density) * size + 0.5))))
    k = jnp.floor(jnp.asarray(density, jnp.float32) * size + 0.5)
    return jnp.clip(k, 0, size).astype(jnp.int32)


def _order_key(scores: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the float32 ``scores`` (``-0.0 == 0.0``)."""
    x = jnp.asarray(scores).astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits & jnp.uint32(_SIGN_BIT)) != 0
    # Non-negative floats: set the sign bit so they sort above all negatives. Negative
    # floats: flip every bit so that larger magnitudes come first.
    return jnp.where(negative, ~bits, bits | jnp.uint32(_SIGN_BIT))


def _kth_largest_keys(groups: Sequence[Sequence[jax.Array]], ks: Sequence[Any]) -> list[jax.Array]:
    """For each group of key arrays, its ``ks[g]``-th largest value (1-based), all found
    in one loop of 32 counting passes.

    Builds each answer from the most significant bit down: a bit is set when at least
    ``k`` keys of the group are >= the candidate with that bit set. Searching every group
    in the same loop (rather than one loop per leaf) lets XLA fuse the counts of a pass.
    """

    def body(i: jax.Array, answers: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        updated = []
        for keys, k, answer in zip(groups, ks, answers, strict=True):
            candidate = answer | bit
            count = sum((jnp.sum(key >= candidate, dtype=jnp.int32) for key in keys),
                        jnp.int32(0))
            updated.append(jnp.where(count >= k, candidate, answer))
        return tuple(updated)

    start = tuple(jnp.uint32(0) for _ in groups)
    return list(lax.fori_loop(0, 32, body, start))


def _masks_at_threshold(keys: Sequence[jax.Array], threshold: jax.Array,
                        k: Any) -> list[jax.Array]:
    """Masks keeping exactly ``k`` of ``keys`` given their exact k-th largest value."""
    above = [key > threshold for key in keys]
    n_above = sum((jnp.sum(a, dtype=jnp.int32) for a in above), jnp.int32(0))
    ties = [key == threshold for key in keys]
    n_ties = sum((jnp.sum(t, dtype=jnp.int32) for t in ties), jnp.int32(0))
    ties_needed = jnp.asarray(k, jnp.int32) - n_above

    def keep_all_ties(_: None) -> list[jax.Array]:
        return [a | t for a, t in zip(above, ties, strict=True)]

    def keep_first_ties(_: None) -> list[jax.Array]:
        masks, offset = [], jnp.int32(0)
        for a, t in zip(above, ties, strict=True):
            rank = jnp.cumsum(t.ravel(), dtype=jnp.int32).reshape(t.shape) + offset
            masks.append(a | (t & (rank <= ties_needed)))
            offset = offset + jnp.sum(t, dtype=jnp.int32)
        return masks

    # The cumulative sum that ranks ties costs as much as the search, so it runs only
    # when more entries tie at the threshold than may be kept.
    masks = lax.cond(n_ties > ties_needed, keep_first_ties, keep_all_ties, None)
    keep_none = jnp.asarray(k) <= 0
    return [jnp.where(keep_none, False, m) for m in masks]


def _grouped_topk(groups: Sequence[Sequence[jax.Array]],
                  ks: Sequence[Any]) -> list[list[jax.Array]]:
    """For each group of leaves, masks keeping exactly ``ks[g]`` of its largest entries
    jointly (one group per leaf: per-layer top-k; one group of all leaves: global)."""
    keys = [[_order_key(leaf) for leaf in group] for group in groups]
    thresholds = _kth_largest_keys(keys, ks)
    return [_masks_at_threshold(group_keys, threshold, k)
            for group_keys, threshold, k in zip(keys, thresholds, ks, strict=True)]


def kth_largest(scores: jax.Array, k: Any) -> jax.Array:
    """The exact k-th largest entry of ``scores`` (1-based), as float32, without sorting.

    >>> import jax.numpy as jnp
    >>> float(kth_largest(jnp.array([0.3, -1.0, 2.0, 0.5]), 2))
    0.5
    """
    key = _kth_largest_keys([[_order_key(scores)]], [k])[0]
    negative = (key & jnp.uint32(_SIGN_BIT)) == 0
    bits = jnp.where(negative, ~key, key & jnp.uint32(~_SIGN_BIT & 0xFFFFFFFF))
    return lax.bitcast_convert_type(bits, jnp.float32)


def topk_mask(
    scores: Any,
    density: Any,
    *,
    scope: Scope = "layer",
    check_finite_scores: bool = True,
) -> Any:
    """Boolean mask(s) keeping exactly ``num_kept(density, size)`` of the largest scores.

    Args:
      scores: an array or a pytree of arrays (any real dtype; ranked as float32).
      density: the fraction to keep, in [0, 1]. With ``scope='layer'`` either one number
        for every leaf or a pytree of numbers with the structure of ``scores``; with
        ``scope='global'`` one number for all leaves together.
      scope: ``'layer'`` keeps the top fraction of each leaf; ``'global'`` ranks all
        leaves jointly and keeps ``num_kept(density, total size)`` entries.
      check_finite_scores: raise ``ValueError`` for NaN or inf scores. Under ``jit`` the
        check runs on the device and reports through a host callback.

    Returns:
      Boolean arrays with the structure and shapes of ``scores``. Ties at the threshold
      keep the entries that come first (leaf order, then row-major order).

    >>> import jax.numpy as jnp
    >>> topk_mask(jnp.array([0.1, 0.9, 0.5, 0.9]), 0.5)
    Array([False,  True, False,  True], dtype=bool)
    >>> topk_mask(jnp.array([1.0, 1.0, 1.0, 1.0]), 0.5)  # ties: first entries win
    Array([ True,  True, False, False], dtype=bool)
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    if not leaves:
        return scores
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.number):
            raise TypeError(f"scores must be real numbers, got dtype {jnp.result_type(leaf)}")
    if check_finite_scores:
        check_finite(scores, "scores")

    if scope == "global":
        check_density(density)
        if jnp.ndim(density) != 0:
            raise ValueError("scope='global' takes one density for all leaves")
        total = sum(int(jnp.size(leaf)) for leaf in leaves)
        masks = _grouped_topk([leaves], [num_kept(density, total)])[0]
        return jax.tree_util.tree_unflatten(treedef, masks)

    if isinstance(density, (int, float)) or (hasattr(density, "ndim") and density.ndim == 0):
        densities = [density] * len(leaves)
    else:
        check_same_structure(scores, density, reference_name="scores", other_name="densities",
                             check_shapes=False)
        densities = jax.tree_util.tree_leaves(density)
    for leaf_density in densities:
        check_density(leaf_density)
    ks = [num_kept(d, int(jnp.size(leaf))) for leaf, d in zip(leaves, densities, strict=True)]
    masks = [group[0] for group in _grouped_topk([[leaf] for leaf in leaves], ks)]
    return jax.tree_util.tree_unflatten(treedef, masks)
