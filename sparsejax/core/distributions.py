"""Sparsity distributions: how a total density is shared among the prunable leaves.

:func:`layer_densities` returns one density per leaf (a tree of Python floats with the
structure of the params; ``1.0`` for leaves that are not pruned). The densities are
exact: each is ``k_l / n_l`` for an integer kept count ``k_l``, and the counts add up to
``num_kept(density, total prunable size)``, so the weighted sum of the densities is the
requested total and :func:`sparsejax.topk_mask` keeps exactly ``k_l`` in each leaf.

Distributions:

* ``uniform``: every prunable leaf gets the same density.
* ``erdos_renyi``: density proportional to ``(n_in + n_out) / (n_in * n_out)`` from the
  last two dimensions of the kernel (SET).
* ``erk``: Erdos-Renyi-Kernel, proportional to ``sum(shape) / prod(shape)`` (RigL);
  leaves that would exceed density 1 become dense and the rest is solved again.
* ``global``: one threshold over all prunable leaves of a score tree (default
  ``|params|``); the resulting per-leaf densities are returned.

``overrides`` fixes the density of chosen leaves (by exact path or regular expression);
the remaining budget is shared among the other leaves by the distribution.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import path_str
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern, as_pattern, check_pattern, pattern_mask
from sparsejax.core.topk import num_kept, topk_mask
from sparsejax.core.validation import check_density, check_same_structure

__all__ = [
    "DISTRIBUTIONS",
    "KeptCounts",
    "kept_counts",
    "layer_densities",
    "select_masks",
    "erk_raw_density",
    "erdos_renyi_raw_density",
]

DISTRIBUTIONS = ("uniform", "erdos_renyi", "erk", "global")


def erdos_renyi_raw_density(shape: tuple[int, ...]) -> float:
    """Unnormalised Erdos-Renyi density ``(n_in + n_out) / (n_in * n_out)``."""
    n_in, n_out = shape[-2], shape[-1]
    return (n_in + n_out) / (n_in * n_out)


def erk_raw_density(shape: tuple[int, ...]) -> float:
    """Unnormalised Erdos-Renyi-Kernel density ``sum(shape) / prod(shape)``."""
    return sum(shape) / math.prod(shape)


def _match_overrides(paths: list[str], prunable: list[bool],
                     overrides: Mapping[str, float]) -> dict[int, float]:
    """Index of each leaf an override names -> its density; errors for unknown names."""
    fixed: dict[int, float] = {}
    for pattern, density in overrides.items():
        check_density(density, f"override density for {pattern!r}")
        regex = re.compile(pattern)
        hits = [i for i, p in enumerate(paths) if p == pattern or regex.fullmatch(p)]
        if not hits:
            raise ValueError(
                f"override {pattern!r} names no leaf of the params; leaves are: {paths}"
            )
        for i in hits:
            if not prunable[i]:
                raise ValueError(
                    f"override {pattern!r} names leaf '{paths[i]}', which the prunable "
                    "filter does not prune; widen the filter to prune it"
                )
            fixed[i] = float(density)
    return fixed


def _solve_proportional(raw: dict[int, float], sizes: list[int], budget: float) -> dict[int, float]:
    """Densities ``eps * raw_l`` (capped at 1) whose weighted sum is ``budget``."""
    dense: set[int] = set()
    while True:
        free = [i for i in raw if i not in dense]
        remaining = budget - sum(sizes[i] for i in dense)
        denominator = sum(raw[i] * sizes[i] for i in free)
        if not free or denominator <= 0:
            return {i: 1.0 for i in raw}
        eps = remaining / denominator
        over = {i for i in free if eps * raw[i] > 1.0}
        if not over:
            result = {i: eps * raw[i] for i in free}
            result.update({i: 1.0 for i in dense})
            return result
        dense |= over


def _integer_counts(targets: dict[int, float], sizes: list[int], total: int) -> dict[int, int]:
    """Integer kept counts near ``targets[i] * sizes[i]`` that add up to ``total``
    (largest remainder first, ties to the earlier leaf)."""
    exact = {i: min(max(targets[i], 0.0), 1.0) * sizes[i] for i in targets}
    counts = {i: int(math.floor(v)) for i, v in exact.items()}
    short = total - sum(counts.values())
    by_remainder = sorted(targets, key=lambda i: (-(exact[i] - counts[i]), i))
    while short > 0:
        progressed = False
        for i in by_remainder:
            if short == 0:
                break
            if counts[i] < sizes[i]:
                counts[i] += 1
                short -= 1
                progressed = True
        if not progressed:
            break
    return counts


class _Plan(NamedTuple):
    """How a total density splits before the distribution is applied."""

    treedef: Any
    shapes: list[tuple[int, ...]]
    sizes: list[int]
    is_prunable: list[bool]
    fixed_counts: dict[int, int]  # leaf index -> kept count, for overridden leaves
    free: list[int]  # prunable leaves that share the remaining budget
    budget: int  # kept count shared by the free leaves
    paths: list[str]


def _plan(params: Any, density: float, prunable: Prunable,
          overrides: Mapping[str, float] | None) -> _Plan:
    check_density(density)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    shapes = [tuple(np.shape(leaf)) for _, leaf in flat]
    sizes = [math.prod(s) for s in shapes]
    is_prunable = [bool(prunable(path, leaf)) for path, (_, leaf) in zip(paths, flat, strict=True)]
    fixed = _match_overrides(paths, is_prunable, overrides or {})
    total_prunable = sum(n for n, p in zip(sizes, is_prunable, strict=True) if p)
    total_kept = num_kept(density, total_prunable)
    fixed_counts = {i: num_kept(d, sizes[i]) for i, d in fixed.items()}
    free = [i for i, p in enumerate(is_prunable) if p and i not in fixed]
    budget = total_kept - sum(fixed_counts.values())
    if budget < 0 or budget > sum(sizes[i] for i in free):
        raise ValueError(
            f"the overrides keep {sum(fixed_counts.values())} weights, which a total density "
            f"of {density} over {total_prunable} prunable weights cannot hold"
        )
    return _Plan(treedef, shapes, sizes, is_prunable, fixed_counts, free, budget, paths)


def _check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown sparsity distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}"
        )


def layer_densities(
    params: Any,
    density: float,
    distribution: str = "erk",
    *,
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
    scores: Any | None = None,
) -> Any:
    """Per-leaf densities for a total ``density`` over the prunable leaves of ``params``.

    Args:
      params: the params pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
      density: the fraction of prunable weights kept overall, in [0, 1].
      distribution: one of ``DISTRIBUTIONS``.
      prunable: the filter that says which leaves are pruned.
      overrides: ``{path or regex: density}`` for leaves with a fixed density.
      scores: for ``'global'`` only, the scores ranked jointly (default ``|params|``);
        they must be concrete (use :func:`select_masks` under ``jit``).

    Returns:
      A tree of Python floats with the structure of ``params``.

    >>> import jax.numpy as jnp
    >>> p = {"a": jnp.zeros((100, 10)), "b": jnp.zeros((10, 10)), "bias": jnp.zeros(10)}
    >>> layer_densities(p, 0.5, "uniform")
    {'a': 0.5, 'b': 0.5, 'bias': 1.0}
    >>> d = layer_densities(p, 0.2, "erk")
    >>> round(d["a"] * 1000 + d["b"] * 100)  # kept weights add up exactly
    220
    """
    _check_distribution(distribution)
    plan = _plan(params, density, prunable, overrides)
    if not any(plan.is_prunable):
        # Every density would be 1.0: a wrong filter or a model with nothing to prune.
        paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"no leaf of the params is prunable, so a density has nothing to "
                         f"apply to (the prunable filter rejects every leaf of {paths[:10]})")
    counts = dict(plan.fixed_counts)
    if plan.free:
        if distribution == "global":
            # Default scores |params|: ranked by magnitude inside the search (the same
            # masks as ranking a copy of |params|, without the copy).
            by_magnitude = scores is None
            scores = params if scores is None else scores
            check_same_structure(params, scores, other_name="scores")
            leaves = jax.tree_util.tree_leaves(scores)
            masks = topk_mask([leaves[i] for i in plan.free], count=plan.budget,
                              scope="global", by_magnitude=by_magnitude)
            # Counted on the host: an eager jnp.sum would compile once per leaf shape.
            counts.update({i: int(np.count_nonzero(np.asarray(m)))
                           for i, m in zip(plan.free, masks, strict=True)})
        else:
            counts.update(_proportional_counts(plan, distribution))
        warn_empty_layers(density, [plan.paths[i] for i in plan.free if counts[i] == 0])
    densities = [
        counts[i] / plan.sizes[i] if i in counts and plan.sizes[i] else 1.0
        for i in range(len(plan.sizes))
    ]
    return jax.tree_util.tree_unflatten(plan.treedef, densities)


def _proportional_counts(plan: _Plan, distribution: str) -> dict[int, int]:
    free_size = sum(plan.sizes[i] for i in plan.free)
    if distribution == "uniform":
        targets = {i: plan.budget / free_size for i in plan.free}
    else:
        raw_fn = erk_raw_density if distribution == "erk" else erdos_renyi_raw_density
        raw = {i: raw_fn(plan.shapes[i]) for i in plan.free}
        targets = _solve_proportional(raw, plan.sizes, plan.budget)
    return _integer_counts(targets, plan.sizes, plan.budget)


class KeptCounts(NamedTuple):
    """How many weights each leaf keeps for a total density, in integers.

    Attributes:
      per_leaf: for each leaf (in leaf order) its kept count, or ``None`` for leaves that
        are not prunable (kept whole) and for the leaves in ``shared``.
      shared: indices of the leaves ranked jointly (distribution ``'global'``), whose
        split depends on the scores.
      shared_count: how many weights the ``shared`` leaves keep together.
    """

    per_leaf: list[int | None]
    shared: list[int]
    shared_count: int


def kept_counts(
    params: Any,
    density: float,
    distribution: str = "erk",
    *,
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
) -> KeptCounts:
    """The exact kept counts behind :func:`select_masks`, from shapes alone.

    >>> import jax.numpy as jnp
    >>> p = {"a": jnp.zeros((100, 10)), "b": jnp.zeros((10, 10)), "bias": jnp.zeros(10)}
    >>> kept_counts(p, 0.5, "uniform")
    KeptCounts(per_leaf=[500, 50, None], shared=[], shared_count=0)
    >>> kept_counts(p, 0.5, "global", overrides={"b": 1.0})
    KeptCounts(per_leaf=[None, 100, None], shared=[0], shared_count=450)
    """
    _check_distribution(distribution)
    plan = _plan(params, density, prunable, overrides)
    counts: list[int | None] = [None] * len(plan.sizes)
    for i, count in plan.fixed_counts.items():
        counts[i] = count
    if distribution == "global":
        if plan.free and plan.budget == 0:
            warn_empty_layers(density, [plan.paths[i] for i in plan.free])
        return KeptCounts(counts, list(plan.free), plan.budget if plan.free else 0)
    if plan.free:
        for i, count in _proportional_counts(plan, distribution).items():
            counts[i] = count
        warn_empty_layers(density, [plan.paths[i] for i in plan.free if counts[i] == 0])
    return KeptCounts(counts, [], 0)


class EmptyLayersWarning(UserWarning):
    """A density keeps no weight in some prunable layer (``sparsejax train`` refuses it
    unless given ``--allow-empty-layers``)."""


def warn_empty_layers(density: float, paths: list[str]) -> None:
    """Warn that ``density`` keeps no weight of the prunable leaves ``paths`` (an override
    of 0 asks for it and is not warned about)."""
    if not paths:
        return
    names = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
    warnings.warn(
        f"density {density:g} (sparsity {1 - density:g}) keeps no weight in {len(paths)} "
        f"prunable layer(s) ({names}): "
        "their outputs no longer depend on their inputs. Lower the sparsity, or give them "
        "a density of their own with overrides", EmptyLayersWarning, stacklevel=3)


def _all_true(leaf: Any) -> jax.Array:
    """An all-``True`` mask of ``leaf``'s shape: made on the host eagerly (``jnp.ones``
    there compiles a program per shape, 17 of them on ResNet-18), a broadcast traced."""
    if isinstance(leaf, jax.core.Tracer):
        return jnp.ones(np.shape(leaf), bool)
    return jnp.asarray(np.ones(np.shape(leaf), bool))


def select_masks(
    scores: Any,
    density: float,
    distribution: str = "erk",
    *,
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
    pattern: str | Pattern = "unstructured",
) -> Any:
    """Score, then keep the top fraction: the masks that keep the largest ``scores``.

    The one selection step behind magnitude pruning, SNIP, GraSP, SynFlow and random
    pruning. ``density`` is the total over prunable leaves, shared by ``distribution``
    (for ``'global'`` by one threshold over all free prunable leaves); leaves that are
    not prunable get all-``True`` masks. Works under ``jit`` (the split is computed from
    shapes alone).

    ``pattern`` (:mod:`sparsejax.core.patterns`; default ``'unstructured'``, any entries)
    restricts which sets of weights each prunable leaf may keep:

    * ``'N:M'``: every prunable leaf keeps exactly ``N`` of every group of ``M``. The
      pattern fixes the density, so ``density`` must be ``N / M`` (else ``ValueError``)
      and ``distribution`` is ignored (every layer's density is ``N / M``, whatever the
      distribution); ``overrides`` may only keep a leaf dense (density 1.0).
    * ``'block:B'`` and ``'channel'``: each leaf keeps the density that ``distribution``
      (and ``overrides``) give it, counted in whole blocks or output channels
      (``num_kept(layer density, number of blocks or channels)``), ranked by the sum of
      their scores. ``'global'`` ranks single weights and is refused with these patterns.

    A prunable leaf whose shape cannot carry the pattern (a dimension not divisible by
    ``M``, a block larger than the kernel, a rank-1 leaf) is a ``ValueError`` naming it.

    >>> import jax.numpy as jnp
    >>> s = {"w": jnp.array([[0.1, 0.9], [0.4, 0.2]]), "b": jnp.array([0.0, 1.0])}
    >>> select_masks(s, 0.5, "uniform")["w"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    >>> select_masks({"w": jnp.arange(8.0).reshape(4, 2)}, 0.5, pattern="2:4")["w"].T
    Array([[False, False,  True,  True],
           [False, False,  True,  True]], dtype=bool)
    """
    pattern = as_pattern(pattern)
    if not pattern.ranks_globally:
        return _select_pattern_masks(scores, density, distribution, pattern, prunable,
                                     overrides)
    counts = kept_counts(scores, density, distribution, prunable=prunable,
                         overrides=overrides)
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    ranked = [i for i, count in enumerate(counts.per_leaf) if count is not None]
    masks: list[Any] = [None if count is not None else _all_true(leaf)
                        for leaf, count in zip(leaves, counts.per_leaf, strict=True)]
    if ranked:  # one search for every leaf (one program, not one per leaf)
        chosen = topk_mask([leaves[i] for i in ranked],
                           count=[counts.per_leaf[i] for i in ranked])
        for i, mask in zip(ranked, chosen, strict=True):
            masks[i] = mask
    if counts.shared:
        chosen = topk_mask([leaves[i] for i in counts.shared], count=counts.shared_count,
                           scope="global")
        for i, mask in zip(counts.shared, chosen, strict=True):
            masks[i] = mask
    return jax.tree_util.tree_unflatten(treedef, masks)


def _select_pattern_masks(scores: Any, density: float, distribution: str, pattern: Pattern,
                          prunable: Prunable, overrides: Mapping[str, float] | None) -> Any:
    """:func:`select_masks` with a structured ``pattern`` (see its docstring)."""
    _check_distribution(distribution)
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
    leaves = [leaf for _, leaf in flat]
    paths = [path_str(p) for p, _ in flat]
    is_prunable = [bool(prunable(path, leaf)) for path, leaf in zip(paths, leaves, strict=True)]
    fixed = _match_overrides(paths, is_prunable, overrides or {})
    # Leaves an override keeps dense carry no pattern, so their shapes need not fit it.
    dense = {paths[i] for i, d in fixed.items() if d == 1.0}
    if pattern.fixed_density is not None:
        partial = {paths[i]: d for i, d in fixed.items() if d != 1.0}
        if partial:
            raise ValueError(f"pattern {pattern} fixes every pruned leaf's density at "
                             f"{pattern.fixed_density:g}; an override may only keep a leaf "
                             f"dense (1.0), got {partial}")
    check_pattern(pattern, scores, density,
                  prunable=lambda path, leaf: path not in dense and prunable(path, leaf))
    if pattern.fixed_density is not None:
        if not any(p and i not in fixed for i, p in enumerate(is_prunable)):
            raise ValueError(f"pattern {pattern}: no leaf of the params is left to prune")
        masks = [pattern_mask(leaf, pattern) if p and i not in fixed
                 else jnp.ones(np.shape(leaf), bool)
                 for i, (leaf, p) in enumerate(zip(leaves, is_prunable, strict=True))]
        return jax.tree_util.tree_unflatten(treedef, masks)
    if distribution == "global":
        raise ValueError(f"pattern {pattern} keeps whole blocks or channels per layer; "
                         f"distribution 'global' ranks single weights across layers: choose "
                         f"'uniform', 'erk' or 'erdos_renyi'")
    counts = kept_counts(scores, density, distribution, prunable=prunable,
                         overrides=overrides)
    masks = [jnp.ones(np.shape(leaf), bool) if count is None or paths[i] in dense
             else pattern_mask(leaf, pattern, count / max(math.prod(np.shape(leaf)), 1))
             for i, (leaf, count) in enumerate(zip(leaves, counts.per_leaf, strict=True))]
    return jax.tree_util.tree_unflatten(treedef, masks)
