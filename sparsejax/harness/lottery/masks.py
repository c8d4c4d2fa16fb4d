"""The lottery driver's masks within a sparsity pattern (:mod:`sparsejax.harness.lottery`,
``LotteryConfig.pattern``): each IMP round prunes by magnitude inside the pattern, and the
random-mask control draws a random mask with the same counts per group.

The rule per pattern (round ``r``, ``round_counts`` removing ``ceil(fraction * kept)``
of what survives each round, as unstructured IMP does with weights):

* ``block:B`` / ``channel``: every pruned layer keeps
  ``round_counts(units, fraction, r)`` whole blocks or output channels (``units`` its
  number of them; ``fraction`` the layer's rate: the output layer's own, or
  ``prune_fraction``), ranked by the sum of their ``|w|`` among the survivors. Layer by
  layer only (``distribution='uniform'``).
* ``N:M``: the rounds step ``N`` down with ``M`` fixed. Round ``r`` keeps
  ``round_counts(M, prune_fraction, r)`` of every group of ``M`` (the largest ``|w|``
  of the group's survivors), in every pruned layer alike, and the run ends at ``N:M``:
  the steps must land on ``N`` (2:4 with 0.2 per round: 4:4, 3:4, 2:4 at round 2) and
  ``rounds`` must be exactly the round that reaches it (fewer would end at another
  ``N``, e.g. 3:4; more would prune past it), else :func:`check_lottery_pattern`
  raises. The output layer follows the others or stays dense (``output_fraction``
  ``None`` or ``0``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import map_with_path
from sparsejax.core.masks import Prunable
from sparsejax.core.patterns import (
    Pattern,
    as_pattern,
    check_pattern,
    pattern_counts,
    pattern_topk,
    pattern_units,
)
from sparsejax.methods.fixed import random_scores
from sparsejax.methods.pruning_scores import exclude_pruned, magnitude_scores

__all__ = ["round_counts", "nm_rounds", "check_lottery_pattern", "pattern_imp_masks",
           "pattern_random_mask"]

PyTree = Any

# one compiled top-k per shape and pattern (the count is traced), not one per op eagerly
_topk = jax.jit(pattern_topk, static_argnums=1)


def round_counts(size: int, fraction: float, rounds: int) -> int:
    """Weights kept of ``size`` after ``rounds`` rounds that each remove
    ``ceil(fraction * remaining)``.

    >>> [round_counts(1000, 0.2, r) for r in range(4)]
    [1000, 800, 640, 512]
    """
    kept = size
    for _ in range(rounds):
        kept -= math.ceil(fraction * kept - 1e-9)
    return kept


def nm_rounds(pattern: Pattern, fraction: float) -> int:
    """The round at which IMP removing ``fraction`` per round reaches ``pattern``'s ``N``
    in every group of ``M``; ``ValueError`` if its steps pass over ``N``.

    >>> nm_rounds(as_pattern("2:4"), 0.2), nm_rounds(as_pattern("4:8"), 0.5)
    (2, 1)
    >>> nm_rounds(as_pattern("3:8"), 0.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: pattern 3:8: prune_fraction 0.5 keeps 8, 4, 2 of every group of 8 ...
    """
    steps = [pattern.m]
    while steps[-1] > pattern.n:
        steps.append(round_counts(pattern.m, fraction, len(steps)))
    if steps[-1] != pattern.n:
        raise ValueError(
            f"pattern {pattern}: prune_fraction {fraction:g} keeps "
            f"{', '.join(map(str, steps))} of every group of {pattern.m} in rounds "
            f"{', '.join(map(str, range(len(steps))))}: it never keeps exactly "
            f"N={pattern.n}; choose another prune_fraction or pattern")
    return len(steps) - 1


def check_lottery_pattern(pattern: str | Pattern, prune_fraction: float,
                          output_fraction: float | None, distribution: str,
                          rounds: int) -> Pattern:
    """Raise ``ValueError`` for settings of the lottery driver that ``pattern`` cannot
    follow (see the module's rules); returns the parsed pattern.

    >>> print(check_lottery_pattern("2:4", 0.2, None, "uniform", 2))
    2:4
    >>> check_lottery_pattern("2:4", 0.2, None, "uniform", 1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: pattern 2:4 is reached at round 2 ... rounds 1 would end at 3:4, not 2:4: ...
    """
    try:
        pattern = as_pattern(pattern)
    except (TypeError, ValueError) as error:
        raise ValueError(f"lottery pattern: {error}") from None
    if pattern.fixed_density is not None:  # N:M
        if output_fraction not in (None, 0):
            raise ValueError(f"pattern {pattern} prunes every layer to {pattern.n} of "
                             f"every {pattern.m}; output_fraction must be 'same' (None) "
                             f"or 0 (dense), got {output_fraction}")
        last = nm_rounds(pattern, prune_fraction)
        if rounds != last:
            path = ", ".join(str(round_counts(pattern.m, prune_fraction, r))
                             for r in range(last + 1))
            if rounds > last:
                ends = "would prune past it"
            else:
                ends = (f"would end at {round_counts(pattern.m, prune_fraction, rounds)}:"
                        f"{pattern.m}, not {pattern}")
            raise ValueError(f"pattern {pattern} is reached at round {last} with "
                             f"prune_fraction {prune_fraction:g} ({path} per group of "
                             f"{pattern.m}); rounds {rounds} {ends}: give rounds = {last}")
    elif not pattern.ranks_globally and distribution != "uniform":
        raise ValueError(f"pattern {pattern} prunes whole blocks or channels layer by "
                         f"layer; it needs distribution 'uniform', got {distribution!r}")
    return pattern


def pattern_imp_masks(pattern: Pattern, params: PyTree, masks: PyTree, round_index: int,
                      prunable: Prunable, fraction_of: Callable[[str], float]) -> PyTree:
    """The masks of IMP round ``round_index`` within a structured ``pattern``: the largest
    ``|w|`` among the survivors ``masks`` of the trained ``params``, at the counts of the
    module's rules; ``fraction_of(path)`` is a pruned layer's rate per round.

    >>> import jax.numpy as jnp
    >>> p = {"fc": {"kernel": jnp.array([[1.0, -4.0], [3.0, 2.0], [0.5, 1.0], [2.0, 0.1]])}}
    >>> m = {"fc": {"kernel": jnp.ones((4, 2), bool)}}
    >>> always = lambda path, leaf: True
    >>> pattern_imp_masks(as_pattern("2:4"), p, m, 1, always, lambda path: 0.5
    ...                   )["fc"]["kernel"].astype(int).T
    Array([[0, 1, 0, 1],
           [1, 1, 0, 0]], dtype=int32)
    """
    check_pattern(pattern, params, prunable=prunable)
    scores = exclude_pruned(magnitude_scores(params), masks)

    def choose(path: str, score: jax.Array) -> jax.Array:
        if not prunable(path, score):
            return jnp.ones(np.shape(score), bool)
        units = pattern_units(pattern, np.shape(score))
        return _topk(score, pattern, round_counts(units, fraction_of(path), round_index))

    return map_with_path(choose, scores)


def pattern_random_mask(pattern: Pattern, masks: PyTree, rng: jax.Array,
                        prunable: Prunable) -> PyTree:
    """A random mask with the counts of ``masks`` in every group of ``pattern`` (every
    N:M group, or each layer's number of whole blocks or channels): the random-mask
    control of a patterned lottery run.

    >>> import jax, jax.numpy as jnp
    >>> m = {"w": jnp.array([[1, 0], [1, 1], [0, 0], [0, 1]], bool)}
    >>> r = pattern_random_mask(as_pattern("2:4"), m, jax.random.PRNGKey(0),
    ...                         lambda path, leaf: True)
    >>> r["w"].astype(int).sum(axis=0)
    Array([2, 2], dtype=int32)
    """
    scores = random_scores(masks, rng)

    def choose(path: str, mask: jax.Array, score: jax.Array) -> jax.Array:
        if not prunable(path, mask):
            return jnp.ones(np.shape(mask), bool)
        return _topk(score, pattern, pattern_counts(mask, pattern))

    return map_with_path(choose, masks, scores)
