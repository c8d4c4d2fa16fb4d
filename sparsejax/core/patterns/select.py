"""Masks within a pattern from scores and densities: the checks a density and a model's
leaves must pass, and the counts and top-k of :mod:`~sparsejax.core.patterns.kinds` as
functions of a pattern's string or object.

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

from sparsejax.core._tree import map_with_path
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns.kinds import Pattern, as_pattern
from sparsejax.core.topk import num_kept, topk_mask
from sparsejax.core.validation import check_density, check_finite, is_concrete

__all__ = [
    "pattern_density",
    "method_pattern",
    "check_pattern",
    "pattern_mask",
    "pattern_units",
    "pattern_topk",
    "pattern_counts",
]


def method_pattern(pattern: str | Pattern, sparsity: float, owner: str) -> Pattern:
    """``pattern`` parsed for a method that prunes ``sparsity`` of its weights: an N:M
    pattern must agree with it (:func:`pattern_density`); errors name ``owner``.

    >>> method_pattern("2:4", 0.5, "rigl")
    NM(n=2, m=4, axis=-2)
    >>> method_pattern("2:4", 0.9, "rigl")
    Traceback (most recent call last):
    ...
    ValueError: rigl: pattern 2:4 fixes the density at 0.5 (sparsity 0.5); got density 0.1
    """
    pattern = as_pattern(pattern)
    try:
        pattern_density(pattern, 1.0 - sparsity)
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None
    return pattern


def pattern_density(pattern: str | Pattern, density: Any = None) -> Any:
    """The density a pattern keeps: ``N / M`` for N:M (where ``density``, if given, must
    agree), else ``density``, which is then required and must lie in [0, 1].

    >>> pattern_density("2:4"), pattern_density("unstructured", 0.3)
    (0.5, 0.3)
    >>> pattern_density("2:4", 0.3)
    Traceback (most recent call last):
    ...
    ValueError: pattern 2:4 fixes the density at 0.5 (sparsity 0.5); got density 0.3
    """
    pattern = as_pattern(pattern)
    fixed = pattern.fixed_density
    if fixed is not None:
        if density is not None:
            if not is_concrete(density):
                raise TypeError(f"pattern {pattern} fixes the density at {fixed:g}; give no "
                                "density (or a concrete one), not a traced value")
            if not np.isclose(float(np.asarray(density)), fixed, rtol=0.0, atol=1e-6):
                raise ValueError(f"pattern {pattern} fixes the density at {fixed:g} "
                                 f"(sparsity {1 - fixed:g}); got density {float(density):g}")
        return fixed
    if density is None:
        raise ValueError(f"pattern {pattern} needs a density (fraction kept)")
    check_density(density)
    return density


def check_pattern(pattern: str | Pattern, params: Any, density: Any = None,
                  prunable: Prunable = default_prunable) -> Pattern:
    """Check up front that every prunable leaf of ``params`` can carry ``pattern`` (and
    that ``density`` agrees with it); returns the parsed pattern.

    Raises one ``ValueError`` that names every leaf that cannot, by its path.

    >>> import jax.numpy as jnp
    >>> params = {"fc1": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)},
    ...           "head": {"kernel": jnp.zeros((6, 2)), "bias": jnp.zeros(2)}}
    >>> str(check_pattern("2:4", {"fc1": params["fc1"]}))
    '2:4'
    >>> check_pattern("2:4", params)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: pattern 2:4 does not fit 1 prunable leaf: head/kernel: ... length 6 ...
    """
    pattern = as_pattern(pattern)
    if pattern.fixed_density is not None or density is not None:
        pattern_density(pattern, density)
    problems: list[str] = []

    def check(path: str, leaf: Any) -> None:
        if prunable(path, leaf):
            try:
                pattern.check_shape(np.shape(leaf), where=path)
            except ValueError as error:
                problems.append(str(error))

    map_with_path(check, params)
    if problems:
        count = f"{len(problems)} prunable " + ("leaf" if len(problems) == 1 else "leaves")
        raise ValueError(f"pattern {pattern} does not fit {count}: " + "; ".join(problems))
    return pattern


def pattern_mask(scores: jax.Array, pattern: str | Pattern, density: Any = None, *,
                 by_magnitude: bool = False, check_finite_scores: bool = True) -> jax.Array:
    """A boolean mask of ``scores``' shape that keeps the highest scores in ``pattern``.

    Exact counts: ``unstructured`` keeps ``num_kept(density, size)`` entries; ``N:M``
    exactly ``N`` of every group of ``M`` (``density`` may be omitted; if given it must
    be ``N / M``); ``block:B`` keeps ``num_kept(density, number of blocks)`` whole blocks,
    ranked by the sum of their scores; ``channel`` keeps ``num_kept(density, channels)``
    output channels (last axis), ranked by the sum of their scores. Scores are
    importances, larger kept (e.g. ``|w|``); ``by_magnitude`` ranks ``|scores|`` instead.
    Works under ``jit`` with ``pattern`` static. ``check_finite_scores=False`` skips the
    NaN/inf check (a per-step top-k whose caller checked its scores, or knows them finite).

    >>> import jax.numpy as jnp
    >>> s = jnp.arange(16.0).reshape(4, 4)
    >>> pattern_mask(s, "block:2", 0.5).astype(int)
    Array([[0, 0, 0, 0],
           [0, 0, 0, 0],
           [1, 1, 1, 1],
           [1, 1, 1, 1]], dtype=int32)
    >>> pattern_mask(s, "channel", 0.25).astype(int)[0]
    Array([0, 0, 0, 1], dtype=int32)
    """
    pattern = as_pattern(pattern)
    density = pattern_density(pattern, density)
    shape = tuple(np.shape(scores))
    pattern.check_shape(shape, where="scores")
    scores = jnp.asarray(scores)
    if pattern.ranks_globally:  # the library's top-k itself, which checks its scores
        return topk_mask(scores, density, by_magnitude=by_magnitude,
                         check_finite_scores=check_finite_scores)
    if check_finite_scores:
        check_finite(scores, "scores")
    if by_magnitude:
        scores = jnp.abs(scores)
    # N:M: num_kept(N / M, M) == N
    return pattern.topk(scores, num_kept(density, pattern.units(shape)))


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
    return pattern.units(shape)


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
    pattern.check_shape(tuple(np.shape(scores)), where="scores")
    return pattern.topk(jnp.asarray(scores), count)


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
    pattern.check_shape(np.shape(mask), where="mask")
    return pattern.counts(mask)
