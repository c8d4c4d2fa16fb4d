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

from sparsejax.core.patterns.kinds import (
    NM,
    Block,
    Channel,
    Pattern,
    PatternKind,
    Unstructured,
    WholeUnits,
    as_pattern,
    nm_group_topk,
    nm_groups,
    nm_ungroup,
)
from sparsejax.core.patterns.rows import per_output_mask, topk_rows
from sparsejax.core.patterns.select import (
    check_pattern,
    method_pattern,
    pattern_counts,
    pattern_density,
    pattern_mask,
    pattern_topk,
    pattern_units,
)

__all__ = [
    "Pattern",
    "PatternKind",
    "Unstructured",
    "NM",
    "Block",
    "Channel",
    "WholeUnits",
    "as_pattern",
    "pattern_density",
    "method_pattern",
    "check_pattern",
    "pattern_mask",
    "pattern_units",
    "pattern_topk",
    "pattern_counts",
    "per_output_mask",
    "topk_rows",
    "nm_groups",
    "nm_ungroup",
    "nm_group_topk",
]
