"""Masks for a schedule of densities, chosen under ``jit`` with a traced index: the kept
counts of every density are computed on the host from shapes alone, once, and the
selection inside a compiled loop or update is an exact top-k with a traced count.

:func:`masks_for_densities` is :func:`sparsejax.select_masks` for such schedules, in any
sparsity pattern (:mod:`sparsejax.core.patterns`). SynFlow's rounds and the scheduled
magnitude pruners (gradual magnitude, magnitude after ``prune_step`` steps) choose their
masks here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.distributions import kept_counts, select_masks
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern, as_pattern, pattern_topk, pattern_units
from sparsejax.core.topk import num_kept, topk_mask_tracked

__all__ = ["masks_for_densities", "schedule_table"]

PyTree = Any


def masks_for_densities(
    params: PyTree, densities: Sequence[float], distribution: str | None = None, *,
    pattern: str | Pattern = "unstructured", prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
) -> Callable[[PyTree, jax.Array], PyTree]:
    """``select(scores, index) -> masks`` keeping what :func:`sparsejax.select_masks` keeps
    at ``densities[index]`` (in ``pattern``), where ``index`` may be traced: the counts of
    every density are computed here once (on the host, from shapes) and the selection
    under ``jit`` is an exact top-k with a traced count. ``distribution`` defaults to
    ``'global'`` where the pattern ranks single weights (unstructured), else ``'uniform'``.

    * unstructured: each leaf's count (or one joint count, ``'global'``), with
      :func:`sparsejax.topk_mask`;
    * ``block:B`` / ``channel``: each leaf's count of whole blocks or output channels,
      ``num_kept(layer density, units)`` with the layer density the distribution (and
      ``overrides``) give at ``densities[index]``;
    * ``N:M``: the pattern fixes the final density, so ``densities[-1]`` must be
      ``N / M``; an earlier density ``d`` keeps ``num_kept(d, M)`` of every group of
      ``M`` (an ``N':M`` mask; e.g. 1.0, 0.8, 0.5 with 2:4 give 4:4, 3:4, 2:4), in every
      prunable leaf whatever the distribution. No density may keep fewer than ``N``.

    The checks of :func:`sparsejax.select_masks` (the leaves' shapes, ``'global'`` with
    blocks or channels, partial overrides with N:M) run here, up front.

    >>> import jax.numpy as jnp
    >>> select = masks_for_densities({"w": jnp.zeros((2, 2))}, [0.75, 0.25], "uniform")
    >>> select({"w": jnp.array([[4.0, 3.0], [2.0, 1.0]])}, jnp.int32(1))["w"]
    Array([[ True, False],
           [False, False]], dtype=bool)
    >>> select = masks_for_densities({"w": jnp.zeros((8, 2))}, [0.8, 0.5], pattern="2:4")
    >>> scores = {"w": jnp.arange(16.0).reshape(8, 2)}
    >>> [int(select(scores, jnp.int32(i))["w"].sum()) for i in range(2)]  # 3:4, then 2:4
    [12, 8]
    """
    return schedule_table(params, densities, distribution, pattern, prunable, overrides).select


def schedule_table(params: PyTree, densities: Sequence[float], distribution: str | None,
                   pattern: str | Pattern, prunable: Prunable,
                   overrides: Mapping[str, float] | None) -> _CountTable | _PatternTable:
    """The hashable table of counts behind :func:`masks_for_densities` (its ``select``
    chooses the masks of a density): single weights (unstructured) take the tree-wide
    counts of :func:`sparsejax.kept_counts`, the other patterns a count of units per
    patterned leaf."""
    pattern = as_pattern(pattern)
    if pattern.ranks_globally:
        return _CountTable.of(params, densities, distribution or "global", prunable, overrides)
    return _PatternTable.of(params, densities, pattern, distribution or "uniform", prunable,
                            overrides)


class _CountTable(NamedTuple):
    """The kept counts of each of several densities, from shapes alone: row ``j`` of
    ``counts`` holds those of the leaves ``fixed`` (one column each); the leaves ``shared``
    (distribution ``'global'``) keep ``shared_counts[j]`` jointly. Hashable, so it can be
    a static argument of a compiled function."""

    counts: tuple[tuple[int, ...], ...]
    shared_counts: tuple[int, ...]
    fixed: tuple[int, ...]
    shared: tuple[int, ...]

    @classmethod
    def of(cls, params: PyTree, densities: Sequence[float], distribution: str,
           prunable: Prunable, overrides: Mapping[str, float] | None) -> _CountTable:
        if not densities:
            raise ValueError("give at least one density")
        plans = [kept_counts(params, float(d), distribution, prunable=prunable,
                             overrides=overrides) for d in densities]
        fixed = tuple(i for i, c in enumerate(plans[0].per_leaf) if c is not None)
        return cls(tuple(tuple(p.per_leaf[i] for i in fixed) for p in plans),
                   tuple(p.shared_count for p in plans), fixed, tuple(plans[0].shared))

    def select(self, scores: PyTree, index: jax.Array) -> PyTree:
        return self.select_tracked(scores, index, None)[0]

    def cut_rows(self) -> int:
        """The rows of the cuts :meth:`select_tracked` returns: one per leaf with a count
        of its own, and one for the leaves ranked together."""
        return len(self.fixed) + (1 if self.shared else 0)

    def select_tracked(self, scores: PyTree, index: jax.Array, cuts: jax.Array | None,
                       by_magnitude: bool = False) -> tuple[PyTree, jax.Array]:
        """``(masks, cuts)``: :meth:`select` (of ``|scores|`` with ``by_magnitude``), whose
        search starts from ``cuts`` (:meth:`cut_rows` rows, from the previous call; ``None``
        the first time), :func:`sparsejax.core.topk.topk_mask_tracked`: the same masks
        whatever ``cuts`` hold, faster when the scores moved little (a top-k every step)."""
        # numpy, then jnp here: select may first run inside a trace, and a jnp array
        # made there and kept would leak that trace into later calls
        counts = jnp.asarray(np.array(self.counts, np.int32).reshape(
            len(self.shared_counts), len(self.fixed)))
        shared_counts = jnp.asarray(np.array(self.shared_counts, np.int32))
        score_leaves, treedef = jax.tree_util.tree_flatten(scores)
        masks: list[Any] = [jnp.ones(np.shape(s), bool) for s in score_leaves]
        new_cuts = []
        n_fixed = len(self.fixed)
        if self.fixed:  # one search call, a count per leaf
            chosen, fixed_cuts = topk_mask_tracked(
                [score_leaves[i] for i in self.fixed], count=list(counts[index]),
                cuts=None if cuts is None else cuts[:n_fixed], check_finite_scores=False,
                by_magnitude=by_magnitude)
            new_cuts.append(fixed_cuts)
            for i, m in zip(self.fixed, chosen, strict=True):
                masks[i] = m
        if self.shared:
            chosen, shared_cuts = topk_mask_tracked(
                [score_leaves[i] for i in self.shared], count=shared_counts[index],
                cuts=None if cuts is None else cuts[n_fixed:], scope="global",
                check_finite_scores=False, by_magnitude=by_magnitude)
            new_cuts.append(shared_cuts)
            for i, m in zip(self.shared, chosen, strict=True):
                masks[i] = m
        found = (jnp.concatenate(new_cuts) if new_cuts
                 else jnp.zeros((0, 2), jnp.float32))
        return jax.tree_util.tree_unflatten(treedef, masks), found


class _PatternTable(NamedTuple):
    """Per density (row of ``counts``), the :func:`~sparsejax.core.patterns.pattern_topk`
    count of each patterned leaf ``leaves`` (one column each; per group for N:M, whole
    blocks or channels otherwise); every other leaf is kept whole. Hashable, so it can
    be a static argument of a compiled function."""

    pattern: Pattern
    counts: tuple[tuple[int, ...], ...]
    leaves: tuple[int, ...]

    @classmethod
    def of(cls, params: PyTree, densities: Sequence[float], pattern: Pattern,
           distribution: str, prunable: Prunable,
           overrides: Mapping[str, float] | None) -> _PatternTable:
        if not densities:
            raise ValueError("give at least one density")
        if pattern.ranks_globally:
            raise ValueError("the pattern table is for patterns of units; single weights "
                             "take the count table (schedule_table chooses)")
        densities = [float(d) for d in densities]
        # select_masks' own checks, on shapes, at the final density
        jax.eval_shape(lambda p: select_masks(p, densities[-1], distribution,
                                              prunable=prunable, overrides=overrides,
                                              pattern=pattern), params)
        shapes = [tuple(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params)]
        if pattern.fixed_density is not None:  # N:M: a count per group
            final = kept_counts(params, densities[-1], "uniform", prunable=prunable,
                                overrides=overrides).per_leaf
            leaves = tuple(i for i, c in enumerate(final)
                           if c is not None and c < int(np.prod(shapes[i])))
            per_group = [num_kept(d, pattern.m) for d in densities[:-1]] + [pattern.n]
            low = [d for d, n in zip(densities, per_group, strict=True) if n < pattern.n]
            if low:
                raise ValueError(f"pattern {pattern}: density {low[0]:g} would keep "
                                 f"{num_kept(low[0], pattern.m)} of every {pattern.m}, "
                                 f"fewer than the pattern's N={pattern.n}")
            return cls(pattern, tuple((n,) * len(leaves) for n in per_group), leaves)
        plans = [kept_counts(params, d, distribution, prunable=prunable,
                             overrides=overrides).per_leaf for d in densities]
        leaves = tuple(i for i, c in enumerate(plans[-1]) if c is not None)
        rows = []
        for plan in plans:
            rows.append(tuple(
                num_kept(plan[i] / max(int(np.prod(shapes[i])), 1),
                         pattern_units(pattern, shapes[i])) for i in leaves))
        return cls(pattern, tuple(rows), leaves)

    def distinct(self) -> _PatternTable:
        """The table without rows equal to the one before: with the pruned weights'
        scores below every live one, such a row keeps exactly the mask it is given."""
        rows = [r for j, r in enumerate(self.counts) if j == 0 or r != self.counts[j - 1]]
        return self._replace(counts=tuple(rows))

    def select(self, scores: PyTree, index: jax.Array) -> PyTree:
        counts = jnp.asarray(np.array(self.counts, np.int32).reshape(
            len(self.counts), len(self.leaves)))[index]
        score_leaves, treedef = jax.tree_util.tree_flatten(scores)
        masks: list[Any] = [jnp.ones(np.shape(s), bool) for s in score_leaves]
        for column, i in enumerate(self.leaves):
            masks[i] = pattern_topk(score_leaves[i], self.pattern, counts[column])
        return jax.tree_util.tree_unflatten(treedef, masks)
