"""The exact top-k searches of :mod:`sparsejax.core.topk`, over rows of scores: the keys, the
counting, and the bitwise search; the sampled search is in
:mod:`sparsejax.core.topk_sampled`.

Every search takes 2-D float32 arrays, one group of scores per row (a leaf, a stack of
leaves of one size, or all leaves of a global top-k concatenated), and an int32 count per
row, and finds per row the cut that keeps exactly that many entries (see docs/design.md,
"Compile time").

Scores are ranked through an order-preserving uint32 image of their float32 values (the
*keys*), and a mask is ``key >= t`` for a cut ``t`` found by counting, never by sorting:
each pass over the scores counts the keys at or above a few candidate cuts, which is
linear in the number of scores and much faster than ``jnp.sort`` or ``lax.top_k`` on CPU.
The bitwise search (:func:`bitwise_topk`) takes 32 passes, one bit of each row's k-th
largest key per pass, over rows of any sizes at once (each row a segment of chunks), so
one small program serves a whole tree.

Ties at the k-th largest score are broken deterministically: the entries that come first
in the row are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SAMPLE_SIZE = 2048
"""The sampled search seeds a row with a strided sample of about this many keys; rows up
to this long are always searched bitwise."""
SAMPLED_ABOVE = 2**17
"""A tracked top-k (:func:`sparsejax.topk_mask_tracked`) searches groups of more entries
than this with the sampled search, the rest with the one bitwise search. The sampled
search takes a few passes per call where the bitwise one takes 32, but its program is
compiled once per group size (about 1.3-1.8 s each on this project's CPU, XLA's default
flags): below this size its passes save less than its program costs. Measured (session
16, docs/benchmarks.md): with 2048 here Edge-Popup's step on ResNet-18 compiled in 26 s,
with 2**17 in 12.8 s (15.8 s in a run on a busier machine), with every group bitwise in
6 s; LeNet-300-100's step time was the
same at 2048 and 2**17, and 1.3x slower with every group bitwise (its 235,200-entry
kernel then counts 32 passes every step)."""
_SIGN_BIT = 0x80000000
_CHUNK = 512
"""The bitwise search counts in chunks of this many entries (see :func:`bitwise_topk`)."""
_EXACT_FLOAT_COUNT = 2**24
"""Counts of up to this many entries are exact as float32 sums (see ``count``)."""
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def order_key(scores: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the float32 ``scores`` (``-0.0``, and subnormals,
    equal to ``0.0``)."""
    x = zero_subnormals(jnp.asarray(scores).astype(jnp.float32))
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits & jnp.uint32(_SIGN_BIT)) != 0
    # Non-negative floats: set the sign bit so they sort above all negatives. Negative
    # floats: flip every bit so that larger magnitudes come first.
    return jnp.where(negative, ~bits, bits | jnp.uint32(_SIGN_BIT))


def key_value(key: jax.Array) -> jax.Array:
    """The float32 whose order key is ``key`` (the inverse of :func:`order_key`)."""
    negative = (key & jnp.uint32(_SIGN_BIT)) == 0
    bits = jnp.where(negative, ~key, key & jnp.uint32(~_SIGN_BIT & 0xFFFFFFFF))
    return lax.bitcast_convert_type(bits, jnp.float32)


def zero_subnormals(x: jax.Array) -> jax.Array:
    """``x`` with subnormal values and ``-0.0`` replaced by ``+0.0``. XLA's CPU backend
    compares float32 subnormals as zero, so a search must see them flushed in every pass
    (and step over them, :func:`sparsejax.core.topk_sampled.above`), or its counts disagree with
    its cuts: ``x >= nextafter(0, inf)`` held for every zero, and a 5,000-entry top-k of
    zeros kept nothing. Flushed everywhere, the ranking is the same on every backend."""
    return jnp.where(jnp.abs(x) < FLOAT32_TINY, jnp.float32(0), x)


def count(flags: jax.Array) -> jax.Array:
    """The number of ``True`` entries along the last axis of ``flags``, as int32, exactly.

    Summing 1.0s in float32 runs about twice as fast on CPU as summing the booleans as
    int32 (measured: 37 against 84 us for 235,200 entries), and is exact in any order of
    addition while every partial sum stays at or below 2**24; longer rows are counted in
    slices of 2**24 entries whose counts are added as int32.
    """
    n = int(flags.shape[-1])
    total = jnp.zeros(flags.shape[:-1], jnp.int32)
    for start in range(0, max(n, 1), _EXACT_FLOAT_COUNT):
        part = flags[..., start:start + _EXACT_FLOAT_COUNT]
        total = total + jnp.sum(jnp.where(part, jnp.float32(1), jnp.float32(0)),
                                axis=-1).astype(jnp.int32)
    return total


def kth_largest_keys(keys: jax.Array, ranks: jax.Array) -> jax.Array:
    """Per row of ``keys`` (``(rows, n)`` uint32), its ``ranks[i, j]``-th largest key
    (1-based), shape ``(rows, r)``: 32 counting passes over all rows at once.

    Builds each answer from the most significant bit down: a bit is set when at least
    ``rank`` keys of the row are >= the candidate with that bit set.
    """

    def body(i: jax.Array, answer: jax.Array) -> jax.Array:
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        candidate = answer | bit
        reached = count(keys[:, None, :] >= candidate[:, :, None])
        return jnp.where(reached >= ranks, candidate, answer)

    # Inside ``shard_map`` the carry must vary over the mesh axes the keys vary over.
    start = vary(jnp.zeros(ranks.shape, jnp.uint32), varying_axes(keys, ranks))
    return lax.fori_loop(0, 32, body, start)


def masks_at_threshold(x: jax.Array, threshold: jax.Array, k: jax.Array,
                       segment: np.ndarray | None = None,
                       at_or_above: jax.Array | None = None) -> jax.Array:
    """Masks keeping exactly ``k[s]`` entries of each segment ``s`` of ``x`` (order keys,
    or float32 values, which compare alike), given each segment's exact k-th largest
    value ``threshold[s]``; ties at it go to the segment's first entries.

    A segment is one row of ``x`` (``segment=None``), or, with ``segment`` (static, one
    sorted segment index per row), the consecutive rows with one index: the chunks of
    :func:`bitwise_topk`. ``at_or_above``, each segment's count of entries at or above
    its threshold, saves a pass when the caller has it.

    Where more entries tie at a threshold than may be kept, a second bitwise search
    finds, per segment, the position up to which ties are kept: one counting pass per
    bit of a position, and none when no segment has such a tie. It is a loop in place
    of a cumulative sum, which compiles in about 0.25 s on this project's CPU and runs
    as fast as a few passes (docs/design.md, "Compile time").
    """
    rows, width = int(x.shape[0]), int(x.shape[1])
    if segment is None:
        def per_segment(per_row: jax.Array) -> jax.Array:
            return per_row

        def of_rows(per_segment_values: jax.Array) -> jax.Array:
            return per_segment_values[:, None]
        start, longest = np.zeros(rows, np.uint32), width
    else:
        def per_segment(per_row: jax.Array) -> jax.Array:
            return _segment_sum(per_row, segment, threshold.shape[0])

        def of_rows(per_segment_values: jax.Array) -> jax.Array:
            return per_segment_values[segment][:, None]
        # Each row's first position in its segment (the chunks of a segment are
        # consecutive rows).
        firsts = np.concatenate([[0], np.flatnonzero(np.diff(segment)) + 1])
        chunk = np.arange(rows) - np.repeat(firsts, np.diff(np.append(firsts, rows)))
        start, longest = (chunk * width).astype(np.uint32), int(chunk.max() + 1) * width

    cut = of_rows(threshold)
    if at_or_above is None:
        at_or_above = per_segment(count(x >= cut))
    bits = max(1, (longest - 1).bit_length())
    last = np.uint32(2**bits - 1)

    # An entry's earliness, larger for earlier entries of a segment, is ``last - (start
    # + column)``; ``earliness >= p`` is ``column <= room - p`` with ``room = last -
    # start`` per row (``p <= room`` first, or the unsigned difference would wrap). Only
    # the column index is entry-sized: XLA hoists a loop-invariant entry-sized
    # ``earliness`` out of the loop below into an array of the size of ``x``.
    room = jnp.asarray(last - start)[:, None]

    def kept(position_cut: jax.Array) -> jax.Array:
        p = of_rows(position_cut)
        column = lax.broadcasted_iota(jnp.uint32, x.shape, 1)
        early = (p <= room) & (column <= room - p)
        return (x > cut) | ((x == cut) & early)

    too_many_ties = jnp.any(at_or_above > k)

    def more_to_rank(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
        i, _ = carry
        return (i < bits) & too_many_ties

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        i, position_cut = carry
        candidate = position_cut | jnp.left_shift(jnp.uint32(1),
                                                  (bits - 1 - i).astype(jnp.uint32))
        reached = per_segment(count(kept(candidate)))
        return i + 1, jnp.where(reached >= k, candidate, position_cut)

    # The largest earliness cut that still keeps k entries per segment; 0 (every tie
    # kept) where none is too many, and wherever the loop does not run.
    start_cut = vary(jnp.zeros(threshold.shape, jnp.uint32), varying_axes(x, k))
    _, position_cut = lax.while_loop(more_to_rank, body, (jnp.int32(0), start_cut))
    return kept(position_cut) & of_rows(k > 0)


def _segment_sum(per_row: jax.Array, segment: np.ndarray, n_segments: int) -> jax.Array:
    """The sums of ``per_row`` over the rows of each segment (``segment`` sorted)."""
    return jax.ops.segment_sum(per_row, segment, num_segments=n_segments,
                               indices_are_sorted=True)


def bitwise_topk(xs: Sequence[jax.Array], ks: Sequence[jax.Array],
                 ) -> tuple[list[jax.Array], list[jax.Array]]:
    """``(masks, cuts)`` for every row of every array of ``xs`` (float32, ``(rows_i,
    n_i)``): row ``r`` of ``xs[i]`` keeps exactly ``ks[i][r]`` entries, and ``cuts[i][r]``
    is its k-th largest entry. One bitwise search over all of them, whatever their sizes.

    Each row is a *segment*: the order keys of every row are cut into chunks of up to
    ``_CHUNK`` (the last chunk of a row padded with key 0, below every score), all
    chunks of all rows are the rows of one ``(chunks, width)`` array, and a pass counts
    per chunk and adds the chunk counts per segment (``segment_sum`` over the chunks). So
    one program serves leaves of any number of sizes; 32 passes find each segment's k-th
    largest key bit by bit, and ties at it go to the segment's first entries
    (:func:`masks_at_threshold`).
    """
    width = max(1, min(_CHUNK, max(int(x.shape[1]) for x in xs)))
    pieces, segment_of, layout, n_segments = [], [], [], 0
    for x in xs:
        rows, n = int(x.shape[0]), int(x.shape[1])
        chunks = -(-n // width)
        keys = order_key(x)
        if chunks * width != n:
            keys = jnp.pad(keys, ((0, 0), (0, chunks * width - n)))
        pieces.append(keys.reshape(rows * chunks, width))
        segment_of.append(np.repeat(np.arange(n_segments, n_segments + rows), chunks))
        layout.append((rows, chunks, n))
        n_segments += rows
    keys = jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    segment = np.concatenate(segment_of).astype(np.int32)
    k = jnp.concatenate([jnp.reshape(jnp.asarray(k, jnp.int32), (-1,)) for k in ks])

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array]
             ) -> tuple[jax.Array, jax.Array]:
        answer, at_or_above = carry
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        candidate = answer | bit
        reached = _segment_sum(count(keys >= candidate[segment][:, None]), segment,
                               n_segments)
        accept = reached >= k
        return jnp.where(accept, candidate, answer), jnp.where(accept, reached, at_or_above)

    # Inside ``shard_map`` the carry must vary over the mesh axes the keys vary over.
    # Every key, pads included, is at or above the first answer, 0.
    every = np.bincount(segment, minlength=n_segments).astype(np.int32) * width
    start = vary((jnp.zeros(n_segments, jnp.uint32), jnp.asarray(every)),
                 varying_axes(keys, k))
    threshold, at_or_above = lax.fori_loop(0, 32, body, start)
    chunk_masks = masks_at_threshold(keys, threshold, k, segment, at_or_above)
    masks, cuts, at, row = [], [], 0, 0
    values = key_value(threshold)
    for rows, chunks, n in layout:
        masks.append(chunk_masks[at:at + rows * chunks].reshape(rows, chunks * width)[:, :n])
        cuts.append(values[row:row + rows])
        at, row = at + rows * chunks, row + rows
    return masks, cuts


def _vma(x: Any) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) that ``x`` varies over; empty
    elsewhere."""
    aval = jax.typeof(x)
    found = getattr(aval, "vma", None)
    if found is None:
        found = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(found or ())


def varying_axes(*trees: Any) -> tuple:
    """The manual mesh axes that any leaf of ``trees`` varies over, in a fixed order."""
    axes: set = set()
    for leaf in jax.tree_util.tree_leaves(trees):
        axes |= _vma(leaf)
    return tuple(sorted(axes, key=str))


def vary(tree: Any, axes: tuple) -> Any:
    """``tree`` with every leaf made varying over ``axes`` (a no-op outside ``shard_map``):
    loop carries and branch results built from constants must match the type of what
    the loop body computes from the per-device scores (``check_vma``)."""
    if not axes:
        return tree

    def one(x: Any) -> Any:
        missing = tuple(a for a in axes if a not in _vma(x))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(one, tree)
