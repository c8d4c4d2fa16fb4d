"""One type per kind of sparsity pattern, behind one interface.

Every kind answers the same questions, so code that chooses masks asks the pattern
instead of branching on its kind:

* ``str(pattern)``: its string form (``'unstructured'``, ``'2:4'``, ``'block:4'``,
  ``'channel'``), what ``result.json``, tickets and ``--pattern`` hold;
* :meth:`Pattern.check_shape`: whether a leaf of a given shape can carry it;
* :meth:`Pattern.units`: how many units a leaf has (entries; the ``M`` entries of one
  N:M group, whose count is per group; whole blocks; whole output channels);
* :meth:`Pattern.topk`: keep a count of units with the highest scores (traced counts
  too), with the library's one exact top-k and its ties;
* :meth:`Pattern.counts`: the counts of a mask, as :meth:`~Pattern.topk` takes them;
* :attr:`Pattern.fixed_density` (N:M fixes ``N / M``) and :attr:`Pattern.ranks_globally`
  (only single weights can be ranked across layers).

All are frozen dataclasses: hashable static arguments of ``jax.jit``.

>>> import jax.numpy as jnp
>>> NM(2, 4).topk(jnp.array([[4.0], [1.0], [3.0], [2.0]]), 2).ravel()
Array([ True, False,  True, False], dtype=bool)
>>> [str(p) for p in (Unstructured(), NM(2, 4), Block(8), Channel())]
['unstructured', '2:4', 'block:8', 'channel']
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.patterns.rows import (
    SHORT_ROW,
    group_rows,
    nm_topk_in_place,
    topk_rows,
    ungroup_rows,
)
from sparsejax.core.topk import topk_mask
from sparsejax.core.validation import is_int

__all__ = [
    "Pattern",
    "PatternKind",
    "Unstructured",
    "NM",
    "Block",
    "Channel",
    "WholeUnits",
    "as_pattern",
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
    """A sparsity pattern: :class:`Unstructured`, :class:`NM`, :class:`Block` or
    :class:`Channel`. Build one from its string with :meth:`parse` (or
    :func:`as_pattern`). Impossible parameters raise ``ValueError`` when it is built;
    those that depend on a kernel's shape, in :meth:`check_shape`.

    >>> Pattern.parse("2:4")
    NM(n=2, m=4, axis=-2)
    >>> str(Pattern.parse("block:8")), Pattern.parse("4:8").fixed_density
    ('block:8', 0.5)
    >>> Pattern.parse("3:2")
    Traceback (most recent call last):
    ...
    ValueError: N:M pattern needs 1 <= N <= M, got N=3, M=2
    """

    kind: ClassVar[PatternKind]
    #: Whether one ranking of single weights across leaves (``distribution='global'``)
    #: can carry the pattern: only :class:`Unstructured`.
    ranks_globally: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Pattern:
        if cls in (Pattern, WholeUnits):  # what the old Pattern("nm", n=2, m=4) now meets
            raise TypeError(f"{cls.__name__} is the interface of the pattern kinds; build "
                            "one with Pattern.parse('2:4') or as NM(2, 4), Block(4), "
                            "Channel() or Unstructured()")
        return super().__new__(cls)

    @staticmethod
    def parse(spec: str) -> Pattern:
        """The pattern a string names: ``'unstructured'``, ``'N:M'``, ``'N:M@AXIS'``,
        ``'block:B'`` or ``'channel'``."""
        if not isinstance(spec, str):
            raise TypeError(f"a pattern is a string ({_SYNTAX}) or a Pattern, got {spec!r}")
        text = spec.strip().lower()
        if text == "unstructured":
            return Unstructured()
        if text == "channel":
            return Channel()
        if found := _NM.match(text):
            n, m, axis = found.groups()
            return NM(int(n), int(m), -2 if axis is None else int(axis))
        if found := _BLOCK.match(text):
            return Block(int(found.group(1)))
        raise ValueError(f"unknown pattern {spec!r}; a pattern is {_SYNTAX}")

    def __str__(self) -> str:
        return self.kind

    @property
    def fixed_density(self) -> float | None:
        """The density the pattern fixes (``N / M`` for N:M); ``None`` for the others."""
        return None

    def check_shape(self, shape: tuple[int, ...], where: str = "kernel") -> None:
        """Raise ``ValueError`` (its message starting with ``where``) unless a leaf of
        ``shape`` can carry this pattern.

        >>> Pattern.parse("2:4").check_shape((6, 3), where="fc1/kernel")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: fc1/kernel: pattern 2:4 groups 4 consecutive weights along axis -2, ...
        """
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(f"{where}: pattern {self} needs a kernel of rank >= 2 (Dense "
                             f"(in, out) or conv (kh, kw, in, out)), got shape {shape}")

    def units(self, shape: tuple[int, ...]) -> int:
        """How many units :meth:`topk`'s count ranges over for a leaf of ``shape``."""
        raise NotImplementedError

    def topk(self, scores: jax.Array, count: Any) -> jax.Array:
        """Keep ``count`` units (traced or not) with the highest scores: a boolean mask of
        ``scores``' shape. Scores are not checked for NaN or inf (the caller's job)."""
        raise NotImplementedError

    def counts(self, mask: jax.Array) -> Any:
        """The counts of a ``mask`` that obeys the pattern, as :meth:`topk` takes them."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Unstructured(Pattern):
    """Any entries: one exact top-k per leaf (:func:`~sparsejax.topk_mask`); a count is of
    entries, and leaves can be ranked together.

    >>> Unstructured().units((4, 6)), int(Unstructured().counts(jnp.eye(3, dtype=bool)))
    (24, 3)
    """

    kind: ClassVar[PatternKind] = "unstructured"
    ranks_globally: ClassVar[bool] = True

    def check_shape(self, shape: tuple[int, ...], where: str = "kernel") -> None:
        del shape, where  # any leaf

    def units(self, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape, dtype=np.int64))

    def topk(self, scores: jax.Array, count: Any) -> jax.Array:
        return topk_mask(jnp.asarray(scores), count=count, check_finite_scores=False)

    def counts(self, mask: jax.Array) -> Any:
        return jnp.sum(jnp.asarray(mask).astype(jnp.int32), dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class NM(Pattern):
    """In every group of ``m`` consecutive weights along ``axis`` (default ``-2``, the
    input axis of a Dense ``(in, out)`` or conv ``(kh, kw, in, out)`` kernel), exactly
    ``n`` are kept: the density is fixed at ``n / m``. A count is per group (one for all
    groups, or one per group in :func:`nm_groups` order).

    >>> NM(2, 4).units((8, 3)), NM(2, 4, axis=-1), str(NM(2, 4, axis=-1))
    (4, NM(n=2, m=4, axis=-1), '2:4@-1')
    """

    n: int
    m: int
    axis: int = -2
    kind: ClassVar[PatternKind] = "nm"

    def __post_init__(self) -> None:
        if not (is_int(self.n) and is_int(self.m) and is_int(self.axis)):
            raise TypeError(f"N:M pattern needs integer N, M and axis, got N={self.n!r}, "
                            f"M={self.m!r}, axis={self.axis!r}")
        if not 1 <= self.n <= self.m:
            raise ValueError(f"N:M pattern needs 1 <= N <= M, got N={self.n}, M={self.m}")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" + ("" if self.axis == -2 else f"@{self.axis}")

    @property
    def fixed_density(self) -> float | None:
        return self.n / self.m

    def check_shape(self, shape: tuple[int, ...], where: str = "kernel") -> None:
        super().check_shape(shape, where)
        shape = tuple(int(d) for d in shape)
        if not -len(shape) <= self.axis < len(shape):
            raise ValueError(f"{where}: pattern {self} groups along axis {self.axis}, "
                             f"which a leaf of shape {shape} does not have")
        length = shape[self.axis]
        if length % self.m:
            raise ValueError(f"{where}: pattern {self} groups {self.m} consecutive "
                             f"weights along axis {self.axis}, whose length {length} "
                             f"(shape {shape}) is not divisible by {self.m}")

    def units(self, shape: tuple[int, ...]) -> int:
        return self.m

    def topk(self, scores: jax.Array, count: Any) -> jax.Array:
        if jnp.ndim(count) == 0 and self.m <= SHORT_ROW:
            return nm_topk_in_place(scores, count, self.m, self.axis)
        rows = group_rows(scores, self.m, self.axis)
        counts = jnp.broadcast_to(jnp.asarray(count, jnp.int32), (rows.shape[0],))
        return ungroup_rows(topk_rows(rows, counts), self.axis, np.shape(scores))

    def counts(self, mask: jax.Array) -> Any:
        rows = group_rows(jnp.asarray(mask).astype(jnp.int32), self.m, self.axis)
        return jnp.sum(rows, axis=1, dtype=jnp.int32)


class WholeUnits(Pattern):
    """Patterns that keep or prune whole units, ranked by the sum of their scores
    (:class:`Block`, :class:`Channel`): a new kind of this family defines ``units``,
    ``unit_sums`` and ``spread`` (``docs/examples/new_pattern.py``)."""

    def unit_sums(self, scores: jax.Array) -> jax.Array:
        raise NotImplementedError

    def spread(self, kept: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The mask of ``shape`` that the kept units cover."""
        raise NotImplementedError

    def topk(self, scores: jax.Array, count: Any) -> jax.Array:
        scores = jnp.asarray(scores)
        kept = topk_mask(self.unit_sums(scores), count=count, check_finite_scores=False)
        return self.spread(kept, scores.shape)

    def counts(self, mask: jax.Array) -> Any:
        mask = jnp.asarray(mask).astype(jnp.int32)
        per_unit = int(np.prod(mask.shape, dtype=np.int64)) // self.units(mask.shape)
        return jnp.sum(self.unit_sums(mask) == per_unit, dtype=jnp.int32)  # whole units


@dataclasses.dataclass(frozen=True)
class Block(WholeUnits):
    """``block x block`` blocks over the kernel's last two axes ``(in, out)`` (for a conv
    kernel, separately at every ``(kh, kw)`` tap), kept or pruned whole.

    >>> Block(2).units((4, 6)), Block(2).units((3, 3, 4, 6))
    (6, 54)
    """

    block: int
    kind: ClassVar[PatternKind] = "block"

    def __post_init__(self) -> None:
        if not is_int(self.block):
            raise TypeError(f"block pattern needs an integer block size, got {self.block!r}")
        if self.block < 1:
            raise ValueError(f"block pattern needs a block size >= 1, got {self.block}")

    def __str__(self) -> str:
        return f"block:{self.block}"

    def check_shape(self, shape: tuple[int, ...], where: str = "kernel") -> None:
        super().check_shape(shape, where)
        shape = tuple(int(d) for d in shape)
        rows, cols = shape[-2:]
        b = self.block
        if b > rows or b > cols:
            raise ValueError(f"{where}: block {b}x{b} is larger than the kernel's last "
                             f"two axes {(rows, cols)} (shape {shape})")
        if rows % b or cols % b:
            raise ValueError(f"{where}: block {b}x{b} does not divide the kernel's last "
                             f"two axes {(rows, cols)} (shape {shape})")

    def units(self, shape: tuple[int, ...]) -> int:
        *lead, rows, cols = (int(d) for d in shape)
        return int(np.prod(lead, dtype=np.int64)) * (rows // self.block) * (cols // self.block)

    def unit_sums(self, scores: jax.Array) -> jax.Array:
        b = self.block
        *lead, rows, cols = scores.shape
        return scores.reshape(*lead, rows // b, b, cols // b, b).sum(axis=(-3, -1))

    def spread(self, kept: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jnp.repeat(jnp.repeat(kept, self.block, axis=-2), self.block, axis=-1)


@dataclasses.dataclass(frozen=True)
class Channel(WholeUnits):
    """Whole output channels (neurons; the kernel's last axis).

    >>> Channel().units((3, 3, 8, 5))
    5
    """

    kind: ClassVar[PatternKind] = "channel"

    def units(self, shape: tuple[int, ...]) -> int:
        return int(shape[-1])

    def unit_sums(self, scores: jax.Array) -> jax.Array:
        return scores.reshape(-1, scores.shape[-1]).sum(axis=0)

    def spread(self, kept: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jnp.broadcast_to(kept, shape)


def as_pattern(pattern: str | Pattern) -> Pattern:
    """``pattern`` itself if it is a :class:`Pattern`, else :meth:`Pattern.parse` of it.

    >>> as_pattern("channel") == Channel()
    True
    """
    return pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)


def _nm(pattern: str | Pattern, owner: str) -> NM:
    pattern = as_pattern(pattern)
    if not isinstance(pattern, NM):
        raise ValueError(f"{owner} needs an N:M pattern, got {pattern}")
    return pattern


def nm_groups(x: jax.Array, pattern: str | Pattern) -> jax.Array:
    """The groups of an N:M pattern as rows: ``x`` of a kernel's shape to an array of
    shape ``(groups, M)`` (the axis moved last, then split into runs of ``M``);
    :func:`nm_ungroup` is its inverse.

    >>> nm_groups(jnp.arange(8).reshape(4, 2), "2:4")  # each output's 4 inputs
    Array([[0, 2, 4, 6],
           [1, 3, 5, 7]], dtype=int32)
    """
    pattern = _nm(pattern, "nm_groups")
    pattern.check_shape(np.shape(x), where="array")
    return group_rows(x, pattern.m, pattern.axis)


def nm_ungroup(rows: jax.Array, pattern: str | Pattern, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`nm_groups`: rows ``(groups, M)`` back to ``shape``.

    >>> x = jnp.arange(8).reshape(4, 2)
    >>> bool(jnp.all(nm_ungroup(nm_groups(x, "2:4"), "2:4", x.shape) == x))
    True
    """
    return ungroup_rows(rows, _nm(pattern, "nm_ungroup").axis, shape)


def nm_group_topk(scores: jax.Array, pattern: str | Pattern, counts: Any) -> jax.Array:
    """Keep the ``counts[g]`` highest scores of every group ``g`` of an N:M pattern: a
    boolean mask of ``scores``' shape. ``counts`` is one integer per group (shape
    ``(groups,)``, in :func:`nm_groups` order; traced or not) or one for all; each group
    is ranked like the library's exact top-k, so ties go to the first entries along the
    axis. Scores are not checked for NaN or inf (``-inf`` is a valid "never" score).

    >>> s = jnp.array([[4.0, 1.0], [3.0, 2.0], [1.0, 5.0], [2.0, 6.0]])
    >>> nm_group_topk(s, "2:4", jnp.array([1, 3])).astype(int).T
    Array([[1, 0, 0, 0],
           [0, 1, 1, 1]], dtype=int32)
    """
    pattern = _nm(pattern, "nm_group_topk")
    pattern.check_shape(np.shape(scores), where="array")
    return pattern.topk(scores, counts)
