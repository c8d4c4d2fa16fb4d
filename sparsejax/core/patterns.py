"""Sparsity patterns: which sets of weights a mask may keep, independent of the method.

A :class:`Pattern` is one of

* ``"unstructured"``: any entries (one exact top-k per leaf, :func:`~sparsejax.topk_mask`);
* ``"N:M"`` (e.g. ``"2:4"``): in every group of ``M`` consecutive weights along one axis,
  exactly ``N`` are kept. The axis defaults to ``-2``, the kernel's input (reduction)
  axis of a Dense kernel ``(in, out)`` and of a conv kernel ``(kh, kw, in, out)``; another
  one is written ``"2:4@-1"``. The pattern fixes the density at ``N / M``;
* ``"block:B"``: ``B x B`` blocks over the kernel's last two axes ``(in, out)`` (for a
  conv kernel, separately at every ``(kh, kw)`` tap), kept or pruned whole, ranked by the
  sum of the scores in the block;
* ``"channel"``: whole output channels (neurons; the kernel's last axis), ranked by the
  sum of their scores.

Every structured pattern reduces to the library's one exact top-k (``topk_mask``, which
keeps ``num_kept(density, size) = floor(density * size + 0.5)``): of the block or
channel sums, or, for N:M, of each group (``count=N``; a group of at most 16 is ranked
by comparing its entries pairwise on ``topk_mask``'s own order keys, cheaper than its
search). So counts are exact and ties go to the first entries in row-major order (within
a group: the first along the axis), as everywhere in sparsejax.

>>> import jax.numpy as jnp
>>> scores = jnp.array([[4.0, 1.0], [3.0, 2.0], [1.0, 5.0], [2.0, 6.0]])  # (in=4, out=2)
>>> pattern_mask(scores, "2:4").astype(int).T  # each output keeps 2 of its 4 inputs
Array([[1, 1, 0, 0],
       [0, 0, 1, 1]], dtype=int32)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import map_with_path
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.topk import num_kept, topk_mask
from sparsejax.core.topk_search import order_key
from sparsejax.core.validation import check_density, check_finite, is_concrete, is_int

__all__ = [
    "Pattern",
    "PatternKind",
    "as_pattern",
    "pattern_density",
    "method_pattern",
    "check_pattern",
    "pattern_mask",
    "per_output_mask",
    "nm_groups",
    "nm_ungroup",
    "nm_group_topk",
]

PatternKind = Literal["unstructured", "nm", "block", "channel"]

_NM = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*(?:@\s*(-?\d+)\s*)?$")
_BLOCK = re.compile(r"^\s*block\s*:\s*(-?\d+)\s*$")
_SYNTAX = ("'unstructured', 'N:M' (e.g. '2:4'; '2:4@AXIS' for another axis than -2), "
           "'block:B' (e.g. 'block:4') or 'channel'")


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A sparsity pattern; hashable, so it can be a static argument of ``jax.jit``.

    Build one with :meth:`parse` (or :func:`as_pattern`) from a string, or directly:
    ``Pattern("nm", n=2, m=4)``, ``Pattern("block", block=4)``, ``Pattern("channel")``.
    Impossible parameters (``N < 1``, ``N > M``, a block size below 1) raise
    ``ValueError`` here; those that depend on a kernel's shape, in :meth:`check_shape`.

    >>> Pattern.parse("2:4")
    Pattern(kind='nm', n=2, m=4, axis=-2, block=0)
    >>> str(Pattern.parse("block:8")), Pattern.parse("4:8").fixed_density
    ('block:8', 0.5)
    >>> Pattern.parse("3:2")
    Traceback (most recent call last):
    ...
    ValueError: N:M pattern needs 1 <= N <= M, got N=3, M=2
    """

    kind: PatternKind = "unstructured"
    n: int = 0
    m: int = 0
    axis: int = -2
    block: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("unstructured", "nm", "block", "channel"):
            raise ValueError(f"unknown pattern kind {self.kind!r}; a pattern is {_SYNTAX}")
        if self.kind == "nm":
            if not (is_int(self.n) and is_int(self.m) and is_int(self.axis)):
                raise TypeError(f"N:M pattern needs integer N, M and axis, got N={self.n!r}, "
                                f"M={self.m!r}, axis={self.axis!r}")
            if not 1 <= self.n <= self.m:
                raise ValueError(f"N:M pattern needs 1 <= N <= M, got N={self.n}, M={self.m}")
        if self.kind == "block":
            if not is_int(self.block):
                raise TypeError(f"block pattern needs an integer block size, got {self.block!r}")
            if self.block < 1:
                raise ValueError(f"block pattern needs a block size >= 1, got {self.block}")

    @classmethod
    def parse(cls, spec: str) -> Pattern:
        """The pattern a string names: ``'unstructured'``, ``'N:M'``, ``'N:M@AXIS'``,
        ``'block:B'`` or ``'channel'``."""
        if not isinstance(spec, str):
            raise TypeError(f"a pattern is a string ({_SYNTAX}) or a Pattern, got {spec!r}")
        text = spec.strip().lower()
        if text == "unstructured":
            return cls()
        if text == "channel":
            return cls("channel")
        if found := _NM.match(text):
            n, m, axis = found.groups()
            return cls("nm", n=int(n), m=int(m), axis=-2 if axis is None else int(axis))
        if found := _BLOCK.match(text):
            return cls("block", block=int(found.group(1)))
        raise ValueError(f"unknown pattern {spec!r}; a pattern is {_SYNTAX}")

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}" + ("" if self.axis == -2 else f"@{self.axis}")
        if self.kind == "block":
            return f"block:{self.block}"
        return self.kind

    @property
    def fixed_density(self) -> float | None:
        """``N / M`` for an N:M pattern (which fixes the density); ``None`` otherwise."""
        return self.n / self.m if self.kind == "nm" else None

    def check_shape(self, shape: tuple[int, ...], where: str = "kernel") -> None:
        """Raise ``ValueError`` (its message starting with ``where``) unless a leaf of
        ``shape`` can carry this pattern.

        >>> Pattern.parse("2:4").check_shape((6, 3), where="fc1/kernel")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: fc1/kernel: pattern 2:4 groups 4 consecutive weights along axis -2, ...
        """
        shape = tuple(int(d) for d in shape)
        if self.kind == "unstructured":
            return
        if len(shape) < 2:
            raise ValueError(f"{where}: pattern {self} needs a kernel of rank >= 2 (Dense "
                             f"(in, out) or conv (kh, kw, in, out)), got shape {shape}")
        if self.kind == "nm":
            if not -len(shape) <= self.axis < len(shape):
                raise ValueError(f"{where}: pattern {self} groups along axis {self.axis}, "
                                 f"which a leaf of shape {shape} does not have")
            length = shape[self.axis]
            if length % self.m:
                raise ValueError(f"{where}: pattern {self} groups {self.m} consecutive "
                                 f"weights along axis {self.axis}, whose length {length} "
                                 f"(shape {shape}) is not divisible by {self.m}")
        if self.kind == "block":
            rows, cols = shape[-2:]
            b = self.block
            if b > rows or b > cols:
                raise ValueError(f"{where}: block {b}x{b} is larger than the kernel's last "
                                 f"two axes {(rows, cols)} (shape {shape})")
            if rows % b or cols % b:
                raise ValueError(f"{where}: block {b}x{b} does not divide the kernel's last "
                                 f"two axes {(rows, cols)} (shape {shape})")


def as_pattern(pattern: str | Pattern) -> Pattern:
    """``pattern`` itself if it is a :class:`Pattern`, else :meth:`Pattern.parse` of it.

    >>> as_pattern("channel") == Pattern("channel")
    True
    """
    return pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)


def method_pattern(pattern: str | Pattern, sparsity: float, owner: str) -> Pattern:
    """``pattern`` parsed for a method that prunes ``sparsity`` of its weights: an N:M
    pattern must agree with it (:func:`pattern_density`); errors name ``owner``.

    >>> method_pattern("2:4", 0.5, "rigl")
    Pattern(kind='nm', n=2, m=4, axis=-2, block=0)
    >>> method_pattern("2:4", 0.9, "rigl")
    Traceback (most recent call last):
    ...
    ValueError: rigl: pattern 2:4 fixes the density at 0.5 (sparsity 0.5); got density 0.1
    """
    pattern = as_pattern(pattern)
    if pattern.kind != "unstructured":
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
    if pattern.kind == "unstructured":
        return topk_mask(scores, density, by_magnitude=by_magnitude,
                         check_finite_scores=check_finite_scores)
    if check_finite_scores:
        check_finite(scores, "scores")
    if by_magnitude:
        scores = jnp.abs(scores)
    # N:M: num_kept(N / M, M) == N
    from sparsejax.core.pattern_units import pattern_topk, pattern_units  # it builds on this module

    return pattern_topk(scores, pattern, num_kept(density, pattern_units(pattern, shape)))


def per_output_mask(scores: jax.Array, density: Any) -> jax.Array:
    """Keep the same fraction of every output channel: for a kernel ``(..., out)``, each
    output ``o`` keeps exactly ``num_kept(density, size // out)`` of ``scores[..., o]``
    (Wanda's unstructured comparison group). Ties: the first entries in row-major order.

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [4.0, 1.0]])
    >>> per_output_mask(s, 0.5).astype(int).T
    Array([[0, 0, 1, 1],
           [1, 1, 0, 0]], dtype=int32)
    """
    shape = tuple(np.shape(scores))
    if len(shape) < 2:
        raise ValueError(f"per_output_mask needs a kernel of rank >= 2 (..., out), got "
                         f"shape {shape}")
    check_density(density)
    scores = jnp.asarray(scores)
    check_finite(scores, "scores")
    rows = scores.reshape(-1, shape[-1]).T  # (out, fan_in)
    kept = _topk_rows(rows, count=num_kept(density, rows.shape[1]))
    return kept.T.reshape(shape)


# Rows this short (N:M groups) are ranked by direct comparison instead of the search.
_SHORT_ROW = 16


def _topk_rows(rows: jax.Array, count: Any) -> jax.Array:
    """``topk_mask(row, count=count)`` of every row of a 2-D array, vectorised; ``count``
    is one integer or one per row. Rows of at most ``_SHORT_ROW`` scores (N:M groups) are
    ranked by comparing every pair: the same keys and ties as ``topk_mask`` (larger first,
    then the first entries), and on CPU much cheaper than its search per row."""
    if rows.shape[0] == 0:
        return jnp.zeros(rows.shape, bool)
    if rows.shape[1] <= _SHORT_ROW:
        keys = order_key(rows)
        index = jnp.arange(rows.shape[1])
        ahead = (keys[:, None, :] > keys[:, :, None]) | (
            (keys[:, None, :] == keys[:, :, None]) & (index[None, :] < index[:, None]))
        rank = jnp.sum(ahead, axis=-1, dtype=jnp.int32)  # entries kept before each one
        return rank < jnp.reshape(jnp.asarray(count, jnp.int32), (-1, 1))
    # the caller checked the scores once for non-finite values
    counts = jnp.broadcast_to(jnp.asarray(count, jnp.int32), (rows.shape[0],))
    return jax.vmap(lambda row, k: topk_mask(row, count=k, check_finite_scores=False))(
        rows, counts)


def nm_groups(x: jax.Array, pattern: str | Pattern) -> jax.Array:
    """The groups of an N:M pattern as rows: ``x`` of a kernel's shape to an array of
    shape ``(groups, M)`` (the axis moved last, then split into runs of ``M``);
    :func:`nm_ungroup` is its inverse.

    >>> import jax.numpy as jnp
    >>> nm_groups(jnp.arange(8).reshape(4, 2), "2:4")  # each output's 4 inputs
    Array([[0, 2, 4, 6],
           [1, 3, 5, 7]], dtype=int32)
    """
    pattern = as_pattern(pattern)
    if pattern.kind != "nm":
        raise ValueError(f"nm_groups needs an N:M pattern, got {pattern}")
    pattern.check_shape(np.shape(x), where="array")
    return jnp.moveaxis(jnp.asarray(x), pattern.axis, -1).reshape(-1, pattern.m)


def nm_ungroup(rows: jax.Array, pattern: str | Pattern, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`nm_groups`: rows ``(groups, M)`` back to ``shape``.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(8).reshape(4, 2)
    >>> bool(jnp.all(nm_ungroup(nm_groups(x, "2:4"), "2:4", x.shape) == x))
    True
    """
    pattern = as_pattern(pattern)
    shape = tuple(int(d) for d in shape)
    moved = list(shape)
    moved.append(moved.pop(pattern.axis % len(shape)))
    return jnp.moveaxis(rows.reshape(moved), -1, pattern.axis)


def nm_group_topk(scores: jax.Array, pattern: str | Pattern, counts: Any) -> jax.Array:
    """Keep the ``counts[g]`` highest scores of every group ``g`` of an N:M pattern: a
    boolean mask of ``scores``' shape. ``counts`` is one integer per group (shape
    ``(groups,)``, in :func:`nm_groups` order; traced or not) or one for all; each group
    is ranked like the library's exact top-k (``topk_mask(row, count=...)``: the same
    order keys), so ties go to the first entries along the axis. Scores are not checked
    for NaN or inf (``-inf`` is a valid "never" score: the prune-and-regrow engine grows
    only where it is not).

    >>> import jax.numpy as jnp
    >>> s = jnp.array([[4.0, 1.0], [3.0, 2.0], [1.0, 5.0], [2.0, 6.0]])
    >>> nm_group_topk(s, "2:4", jnp.array([1, 3])).astype(int).T
    Array([[1, 0, 0, 0],
           [0, 1, 1, 1]], dtype=int32)
    """
    pattern = as_pattern(pattern)
    rows = nm_groups(scores, pattern)
    counts = jnp.broadcast_to(jnp.asarray(counts, jnp.int32), (rows.shape[0],))
    return nm_ungroup(_topk_rows(rows, counts), pattern, np.shape(scores))
