"""Counts of a sparsity pattern in units: entries, the entries of each N:M group, whole
blocks or whole output channels (:mod:`sparsejax.core.patterns`).

:func:`pattern_units` says how many units a leaf has, :func:`pattern_topk` keeps a
given count of them (traced or not: schedules whose count changes under ``jit`` choose
their masks here), and :func:`pattern_counts` reads the counts back from a mask, so a
mask of the same counts per group can be drawn from other scores.

>>> import jax.numpy as jnp
>>> mask = pattern_topk(jnp.arange(8.0).reshape(2, 4), "channel", 2)
>>> mask.astype(int), int(pattern_counts(mask, "channel")), pattern_units("channel", (2, 4))
(Array([[0, 0, 1, 1],
       [0, 0, 1, 1]], dtype=int32), 2, 4)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.patterns import Pattern, as_pattern, nm_group_topk, nm_groups
from sparsejax.core.topk import topk_mask

__all__ = ["pattern_units", "pattern_topk", "pattern_counts"]


def pattern_units(pattern: str | Pattern, shape: tuple[int, ...]) -> int:
    """How many units :func:`pattern_topk`'s count ranges over for a leaf of ``shape``:
    entries (unstructured), the ``M`` entries of one group (N:M, whose count is per
    group), blocks (``block:B``) or output channels (``channel``).

    >>> pattern_units("2:4", (8, 3)), pattern_units("block:2", (4, 6)), pattern_units(
    ...     "channel", (3, 3, 8, 5)), pattern_units("unstructured", (4, 6))
    (4, 6, 5, 24)
    """
    pattern = as_pattern(pattern)
    shape = tuple(int(d) for d in shape)
    pattern.check_shape(shape, where="array")
    if pattern.kind == "nm":
        return pattern.m
    if pattern.kind == "block":
        *lead, rows, cols = shape
        return int(np.prod(lead, dtype=np.int64)) * (rows // pattern.block) * (
            cols // pattern.block)
    if pattern.kind == "channel":
        return shape[-1]
    return int(np.prod(shape, dtype=np.int64))


def _unit_sums(scores: jax.Array, pattern: Pattern) -> jax.Array:
    """The scores summed over each block or channel of ``pattern``."""
    shape = scores.shape
    if pattern.kind == "block":
        b = pattern.block
        *lead, rows, cols = shape
        return scores.reshape(*lead, rows // b, b, cols // b, b).sum(axis=(-3, -1))
    return scores.reshape(-1, shape[-1]).sum(axis=0)  # channel


def pattern_topk(scores: jax.Array, pattern: str | Pattern, count: Any) -> jax.Array:
    """Keep ``count`` units of ``pattern`` with the highest scores: a boolean mask of
    ``scores``' shape. ``count`` (traced or not) counts :func:`pattern_units`: entries
    (unstructured), entries per group (N:M: one count for all groups, or one per group
    as in :func:`~sparsejax.core.patterns.nm_group_topk`), whole blocks or whole output
    channels (ranked by the sum of their scores). The same exact top-k and ties as
    :func:`~sparsejax.core.patterns.pattern_mask`, which is ``pattern_topk`` with the count a
    density gives; scores are not checked for NaN or inf (the caller's job). Schedules
    whose count changes under ``jit`` (SynFlow's rounds, gradual pruning) choose their
    masks here.

    >>> import jax.numpy as jnp
    >>> s = jnp.arange(16.0).reshape(4, 4)
    >>> pattern_topk(s, "block:2", 3).astype(int)
    Array([[0, 0, 1, 1],
           [0, 0, 1, 1],
           [1, 1, 1, 1],
           [1, 1, 1, 1]], dtype=int32)
    >>> pattern_topk(s, "3:4", 3).astype(int).sum(axis=0)  # 3 of the 4 inputs per output
    Array([3, 3, 3, 3], dtype=int32)
    """
    pattern = as_pattern(pattern)
    shape = tuple(np.shape(scores))
    pattern.check_shape(shape, where="scores")
    scores = jnp.asarray(scores)
    if pattern.kind == "unstructured":
        return topk_mask(scores, count=count, check_finite_scores=False)
    if pattern.kind == "nm":
        return nm_group_topk(scores, pattern, count)
    kept = topk_mask(_unit_sums(scores, pattern), count=count, check_finite_scores=False)
    if pattern.kind == "block":
        b = pattern.block
        return jnp.repeat(jnp.repeat(kept, b, axis=-2), b, axis=-1)
    return jnp.broadcast_to(kept, shape)


def pattern_counts(mask: jax.Array, pattern: str | Pattern) -> Any:
    """The counts of a ``mask`` that obeys ``pattern``, as :func:`pattern_topk` takes
    them: kept entries (unstructured), kept entries per group (N:M, an array in
    :func:`~sparsejax.core.patterns.nm_groups` order), whole blocks or channels kept. So
    ``pattern_topk(other_scores, pattern, pattern_counts(mask, pattern))`` is a mask of
    the same counts per group (the lottery's random-mask control).

    >>> import jax.numpy as jnp
    >>> m = jnp.array([[1, 0], [1, 1], [0, 0], [0, 1]], bool)
    >>> pattern_counts(m, "2:4"), int(pattern_counts(m, "unstructured"))
    (Array([2, 2], dtype=int32), 4)
    """
    pattern = as_pattern(pattern)
    mask = jnp.asarray(mask).astype(jnp.int32)
    pattern.check_shape(mask.shape, where="mask")
    if pattern.kind == "unstructured":
        return jnp.sum(mask, dtype=jnp.int32)
    if pattern.kind == "nm":
        return jnp.sum(nm_groups(mask, pattern), axis=1, dtype=jnp.int32)
    per_unit = int(np.prod(mask.shape, dtype=np.int64)) // pattern_units(pattern, mask.shape)
    return jnp.sum(_unit_sums(mask, pattern) == per_unit, dtype=jnp.int32)  # whole units
