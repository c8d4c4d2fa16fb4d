"""The exact top-k search of :mod:`sparsejax.topk`, over rows of equally long scores.

Every search here takes a 2-D float32 array ``x`` of shape ``(rows, n)``, one group of
scores per row (a leaf, a stack of leaves of one size, or all leaves of a global top-k
concatenated), and an int32 count ``k`` per row, and finds per row the cut that keeps
exactly ``k`` entries. All rows move through one loop, so a whole tree of same-sized
leaves costs one compiled search, whatever the number of leaves (see docs/design.md,
"Compile time").

Scores are ranked through an order-preserving uint32 image of their float32 values (the
*keys*), and a mask is ``key >= t`` for a cut ``t`` found by counting, never by sorting:
each pass over the scores counts the keys at or above a few candidate cuts, which is
linear in the number of scores and much faster than ``jnp.sort`` or ``lax.top_k`` on CPU.

* The bitwise search (:func:`bitwise_topk`): 32 passes, one bit of each row's k-th
  largest key per pass, over rows of any sizes at once (each row a segment of chunks),
  so one small program serves a whole tree.
* Longer rows start from two cuts: order statistics of a strided sample of
  ``SAMPLE_SIZE`` scores, or either side of the previous call's cut (a hint). Each later
  pass counts at two cuts interpolated from the counts of the current bracket, and a row
  stops as soon as one cut keeps exactly ``k``. A pass usually shrinks the number of
  scores left in the bracket from ``U`` to about ``sqrt(U)``; once few are left, one
  extraction pass (each sub-row's largest and smallest entry inside the bracket) usually
  recovers all of them. After ``_INTERPOLATION_ROUNDS`` passes it bisects the bracket, so
  adversarial scores (mass ties, spikes) cost at most 40 passes in all. Whatever the data,
  the result is exact: a pass only ever narrows a bracket that provably holds the k-th
  largest score. Each row chooses its own pass every round; a pass runs when some row
  chose it, and changes only the rows that chose it, so every row follows the path it
  would follow alone.

Ties at the k-th largest score are broken deterministically: the entries that come first
in the row are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SAMPLE_SIZE = 2048
"""Rows up to this long are searched bitwise; longer ones seed their search with a
strided sample of about this many keys."""
_SIGN_BIT = 0x80000000
_HINT_SPREADS = 4.0
"""With a hint, the first two cuts sit this many times the cut's last move either side of
the previous cut."""
_HINT_FLOOR = 2.0**-16
"""... and at least this fraction of the previous cut away from it."""
_SAMPLE_SPREADS = 2.0
"""The first two cuts sit this many binomial spreads either side of the sample's estimate
of the k-th largest entry (both fall on one side about 5% of the time)."""
_CUT_SPREADS = 1.0
"""Later cuts sit this many spreads either side of the interpolated cut."""
_ROWS_PER_ROOT = 8
"""An extraction pass views a row of ``n`` entries as about ``8 * sqrt(n)`` sub-rows of
about ``sqrt(n) / 8`` entries (see ``_sub_row_width``)."""
_ENDGAME = 3
"""When at most this many entries are left in the bracket, one pass finds its lowest and
highest entries and the next counts just above the lowest and at the highest."""
_INTERPOLATION_ROUNDS = 8
"""Passes that place cuts by interpolation before the search falls back to bisection."""
_CHUNK = 512
"""The bitwise search counts in chunks of this many entries (see :func:`bitwise_topk`)."""
_EXACT_FLOAT_COUNT = 2**24
"""Counts of up to this many entries are exact as float32 sums (see ``count``)."""
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


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
    (and step over them in :func:`_above` / :func:`_below`), or its counts disagree with
    its cuts: ``x >= nextafter(0, inf)`` held for every zero, and a 5,000-entry top-k of
    zeros kept nothing. Flushed everywhere, the ranking is the same on every backend."""
    return jnp.where(jnp.abs(x) < _FLOAT32_TINY, jnp.float32(0), x)


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


def masks_at_threshold(x: jax.Array, threshold: jax.Array, k: jax.Array) -> jax.Array:
    """Masks keeping exactly ``k[i]`` entries of each row of ``x`` (order keys, or float32
    values, which compare alike) given each row's exact k-th largest value."""
    threshold = threshold[:, None]
    above, ties = x > threshold, x == threshold
    ties_needed = k - count(above)

    def keep_first_ties(_: None) -> jax.Array:
        # jnp.cumsum, not lax.associative_scan: the scan runs 4x faster on CPU but adds
        # seconds to every compile, for a branch that rarely runs.
        rank = jnp.cumsum(ties, axis=1, dtype=jnp.int32)
        return above | (ties & (rank <= ties_needed[:, None]))

    def keep_all_ties(_: None) -> jax.Array:
        return above | ties

    # The cumulative sum that ranks ties costs several counting passes, so it runs only
    # when in some row more entries tie at the threshold than may be kept.
    masks = lax.cond(jnp.any(count(ties) > ties_needed), keep_first_ties, keep_all_ties,
                     None)
    return masks & (k > 0)[:, None]


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
    largest key bit by bit, and ties at it go to the segment's first entries.
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

    def per_segment(chunk_counts: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(chunk_counts, segment, num_segments=n_segments,
                                   indices_are_sorted=True)

    def body(i: jax.Array, answer: jax.Array) -> jax.Array:
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        candidate = answer | bit
        reached = per_segment(count(keys >= candidate[segment][:, None]))
        return jnp.where(reached >= k, candidate, answer)

    # Inside ``shard_map`` the carry must vary over the mesh axes the keys vary over.
    start = vary(jnp.zeros(n_segments, jnp.uint32), varying_axes(keys, k))
    threshold = lax.fori_loop(0, 32, body, start)
    cut = threshold[segment][:, None]
    above, ties = keys > cut, keys == cut
    ties_needed = k - per_segment(count(above))

    def keep_first_ties(_: None) -> jax.Array:
        # Each tie's rank within its segment: a running count over all chunks, less the
        # count before the segment's first entry.
        running = jnp.cumsum(ties.ravel(), dtype=jnp.int32)
        firsts = np.concatenate([[0], np.flatnonzero(np.diff(segment)) + 1]) * width
        before = jnp.concatenate([jnp.zeros(1, jnp.int32), running])[firsts]
        rank = running.reshape(ties.shape) - before[segment][:, None]
        return above | (ties & (rank <= ties_needed[segment][:, None]))

    def keep_all_ties(_: None) -> jax.Array:
        return above | ties

    # The running count that ranks ties costs several passes, so it runs only when in
    # some segment more entries tie at the threshold than may be kept.
    chunk_masks = lax.cond(jnp.any(per_segment(count(ties)) > ties_needed),
                           keep_first_ties, keep_all_ties, None)
    chunk_masks = chunk_masks & (k > 0)[segment][:, None]
    masks, cuts, at, row = [], [], 0, 0
    values = key_value(threshold)
    for rows, chunks, n in layout:
        masks.append(chunk_masks[at:at + rows * chunks].reshape(rows, chunks * width)[:, :n])
        cuts.append(values[row:row + rows])
        at, row = at + rows * chunks, row + rows
    return masks, cuts


def _above(x: jax.Array) -> jax.Array:
    """The next float32 above ``x``, skipping the subnormals (which compare as zero, see
    :func:`zero_subnormals`): above ``0`` comes the smallest normal, above ``-tiny`` zero."""
    return jnp.where(x == 0, jnp.float32(_FLOAT32_TINY),
                     jnp.where(x == -_FLOAT32_TINY, jnp.float32(0),
                               jnp.nextafter(x, jnp.float32(jnp.inf))))


def _below(x: jax.Array) -> jax.Array:
    """The next float32 below ``x``, skipping the subnormals (see :func:`_above`)."""
    return jnp.where(x == 0, jnp.float32(-_FLOAT32_TINY),
                     jnp.where(x == _FLOAT32_TINY, jnp.float32(0),
                               jnp.nextafter(x, jnp.float32(-jnp.inf))))


def _sample_cuts(x: jax.Array, kf: jax.Array,
                 view: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Two first cuts per row ``(rows, 2)``: order statistics of a strided sample of about
    ``SAMPLE_SIZE`` entries either side of its estimate of the k-th largest entry."""
    n = int(x.shape[1])
    sample = view(x[:, ::max(1, n // SAMPLE_SIZE)])
    size = sample.shape[1]
    share = jnp.clip(kf / n, 0.0, 1.0)
    expected_rank = kf * size / n
    spread = jnp.sqrt(size * share * (1.0 - share)) + 1.0
    ranks = jnp.stack([jnp.clip(jnp.round(expected_rank + z * spread), 1, size)
                       for z in (-_SAMPLE_SPREADS, _SAMPLE_SPREADS)], axis=1).astype(jnp.int32)
    return key_value(kth_largest_keys(order_key(sample), ranks))


def sampled_topk(x: jax.Array, k: jax.Array, hints: jax.Array | None = None,
                 view: Callable[[jax.Array], jax.Array] = zero_subnormals,
                 ) -> tuple[jax.Array, jax.Array]:
    """``(masks, cut)`` for long rows of float32 ``x`` (``(rows, n)``): each row keeps
    exactly ``k[i]``; ``cut[i]`` is its k-th largest entry, or a cut that exactly ``k[i]``
    entries reach.

    Each row keeps a bracket ``lo <= (k-th largest) <= hi`` with its counts
    ``c_lo = #(x >= lo) >= k`` and ``c_above = #(x > hi) < k``, and every pass only
    narrows it, so it can only end exact. A pass counts at two cuts; or, once at most
    ``extract_limit`` entries are left in the bracket, extracts them sub-row by sub-row;
    or (when the row has no sub-row view and at most ``_ENDGAME`` are left, or a bracket
    end is still infinite) finds the bracket's extreme entries, after which cuts just
    above the lowest and at the highest settle it.

    ``hints`` (``(rows, 2)``: ``[previous cut, how far it last moved]``) replace the
    sample's first two cuts by two cuts around the previous one.

    ``view`` (elementwise: ``zero_subnormals``, or that of ``abs``) ranks ``view(x)``,
    applied inside every pass, where XLA fuses it into the pass, rather than written out
    as a copy first: this search runs every step (Edge-Popup's top-k).
    """
    n = int(x.shape[1])
    kf = k.astype(jnp.float32)
    axes = varying_axes(x, k, hints)
    x_raw = x

    if hints is None:
        first_cuts = _sample_cuts(x, kf, view)
    else:
        previous, moved = hints[:, 0], hints[:, 1]
        width = jnp.maximum(_HINT_SPREADS * moved, jnp.abs(previous) * _HINT_FLOOR)
        usable = jnp.isfinite(previous) & jnp.isfinite(width) & (width > 0)
        around = jnp.stack([previous - width, previous + width], axis=1)
        first_cuts = lax.cond(
            jnp.all(usable), lambda: vary(around, axes),
            lambda: vary(jnp.where(usable[:, None], around, _sample_cuts(x, kf, view)), axes))

    def interpolated_cuts(lo, hi, c_lo, c_above):
        # Model the bracket's entries as uniform in value between lo and hi. The cut lies
        # above the ``c_lo - k`` lowest of its ``inside`` entries, expected at
        # ``(c_lo - k + 1/2) / (inside + 1)`` of the way up, with the spread of that order
        # statistic: one cut a spread below, one a spread above.
        inside = jnp.maximum(c_lo - c_above, 1).astype(jnp.float32)
        center = jnp.clip((c_lo - kf + 0.5) / (inside + 1.0), 0.0, 1.0)
        spread = _CUT_SPREADS * jnp.sqrt(center * (1.0 - center) / (inside + 2.0))
        shares = jnp.clip(jnp.stack([center - spread, center + spread], axis=1), 0.0, 1.0)
        cuts = jnp.clip(lo[:, None] + (hi - lo)[:, None] * shares, _above(lo)[:, None],
                        hi[:, None])
        # Infinite bracket ends give no usable value: bisect the keys instead.
        return jnp.where(jnp.isfinite(cuts), cuts, bisected_cuts(lo, hi))

    def bisected_cuts(lo, hi):
        lo_key, hi_key = order_key(lo), order_key(hi)
        third = (hi_key - lo_key) // jnp.uint32(3)
        keys = jnp.stack([lo_key + third + jnp.uint32(1), lo_key + 2 * third + jnp.uint32(1)],
                         axis=1)
        return key_value(jnp.minimum(keys, hi_key[:, None]))

    def count_pass(state):
        lo, hi, c_lo, c_above, hit, cut, cuts = state
        counts = count(view(x)[:, None, :] >= cuts[:, :, None])
        for j in range(2):
            t, reached = cuts[:, j], counts[:, j]
            exact = (reached == k) & ~hit
            cut = jnp.where(exact, t, cut)
            hit = hit | exact
            raise_lo = (reached > k) & (t > lo)
            lo, c_lo = jnp.where(raise_lo, t, lo), jnp.where(raise_lo, reached, c_lo)
            lower_hi = (reached < k) & (_below(t) < hi)
            hi = jnp.where(lower_hi, _below(t), hi)
            c_above = jnp.where(lower_hi, reached, c_above)
        return lo, hi, c_lo, c_above, hit, cut, cuts

    def extremes_pass(state):
        lo, hi, c_lo, c_above, hit, cut, _ = state
        x = view(x_raw)
        # The bracket's lowest and highest finite entries, and the counts at them. No
        # entry lies in [lo, bottom) or (top, hi] but infinities, which are the k-th
        # largest entry only when the counts say so (masked scores of -inf, say).
        top = jnp.max(jnp.where((x <= hi[:, None]) & (x < jnp.inf), x, -jnp.inf), axis=1)
        bottom = jnp.min(jnp.where((x >= lo[:, None]) & (x > -jnp.inf), x, jnp.inf), axis=1)
        counts = count(x[:, None, :] >= jnp.stack([bottom, _above(top)], axis=1)[:, :, None])
        c_bottom, c_over_top = counts[:, 0], counts[:, 1]
        minus_inf = c_bottom < k  # only -inf entries below bottom: the answer is -inf
        plus_inf = c_over_top >= k  # only +inf entries above top: the answer is +inf
        new_lo = jnp.where(minus_inf, lo, jnp.where(plus_inf, jnp.inf, jnp.maximum(lo, bottom)))
        new_hi = jnp.where(plus_inf, hi, jnp.where(minus_inf, -jnp.inf, jnp.minimum(hi, top)))
        # #(x >= +inf) is c_over_top and #(x > -inf) is c_bottom.
        c_lo = jnp.where(minus_inf, c_lo, jnp.where(plus_inf, c_over_top, c_bottom))
        c_above = jnp.where(minus_inf, c_bottom, jnp.where(plus_inf, c_above, c_over_top))
        return (new_lo, new_hi, c_lo, c_above, hit, cut,
                jnp.stack([_above(new_lo), new_hi], axis=1))

    width = _sub_row_width(n)
    extract_limit = _extraction_limit(n, width)

    def extraction_pass(state):
        lo, hi, c_lo, c_above, hit, cut, cuts = state
        # Every sub-row's largest and smallest entry inside the bracket. When no sub-row
        # holds more than two of the bracket's entries, and none two equal ones, these are
        # all of them, and the k-th largest is found among them on the spot.
        v = view(x_raw).reshape(x_raw.shape[0], n // width, width)
        inside = (v >= lo[:, None, None]) & (v <= hi[:, None, None])
        high = jnp.max(jnp.where(inside, v, -jnp.inf), axis=2)
        low = jnp.min(jnp.where(inside, v, jnp.inf), axis=2)
        has_high, has_low = high >= lo[:, None], low < high
        entries = jnp.concatenate([jnp.where(has_high, high, -jnp.inf),
                                   jnp.where(has_low, low, -jnp.inf)], axis=1)
        complete = count(has_high) + count(has_low) == c_lo - c_above
        rank = jnp.clip(k - c_above, 1, entries.shape[1])
        value = key_value(kth_largest_keys(order_key(entries), rank[:, None])[:, 0])
        # Entries at or above the answer: those above the bracket plus those extracted.
        reached = c_above + count(entries >= value[:, None])
        return (jnp.where(complete, value, lo), jnp.where(complete, value, hi),
                jnp.where(complete, reached, c_lo), c_above, hit, cut, cuts)

    passes = [count_pass, extremes_pass] + ([extraction_pass] if extract_limit else [])

    def active(carry):
        rounds, _, lo, hi, _, _, hit, _, _ = carry
        return (~hit) & (lo < hi) & (rounds < _INTERPOLATION_ROUNDS + 40)

    def body(carry):
        rounds, tight, *state = carry
        lo, hi, c_lo, c_above = state[:4]
        searching = active(carry)
        inside = c_lo - c_above
        open_end = jnp.isinf(lo) | jnp.isinf(hi)
        # Few entries left: extract them (when the row allows it), or else find the
        # bracket's extremes and count next to them. The extremes pass also closes an
        # open bracket end (the sample's cuts all fell on one side).
        extract = ~tight & ~open_end & (inside <= extract_limit) & (extract_limit > 0)
        few = ~extract & (inside <= _ENDGAME)
        extremes = ~tight & (few | open_end)
        choice = jnp.where(extract, 2, jnp.where(extremes, 1, 0))
        state = tuple(state)
        for j, run in enumerate(passes):
            chosen = searching & (choice == j)

            def apply(s, run=run, chosen=chosen):
                return tuple(jnp.where(chosen.reshape(-1, *[1] * (a.ndim - 1)), a, b)
                             for a, b in zip(run(s), s, strict=True))

            state = lax.cond(jnp.any(chosen), apply, lambda s: s, state)
        lo, hi, c_lo, c_above, hit, cut, cuts = state
        rounds = rounds + searching.astype(jnp.int32)
        # Scalar arithmetic: computing both costs less than a branch.
        placed = jnp.where((rounds < _INTERPOLATION_ROUNDS)[:, None],
                           interpolated_cuts(lo, hi, c_lo, c_above), bisected_cuts(lo, hi))
        # After an extremes pass on few entries, count just above the lowest and at the
        # highest (the cuts it returned). A failed extraction is not retried at once.
        cuts = jnp.where((extremes & few)[:, None], cuts, placed)
        return rounds, extremes | extract, lo, hi, c_lo, c_above, hit, cut, cuts

    rows = x.shape[0]
    # Start "tight" so that the first pass counts at the first cuts.
    start = (jnp.zeros(rows, jnp.int32), jnp.ones(rows, bool),
             jnp.full(rows, -jnp.inf, jnp.float32), jnp.full(rows, jnp.inf, jnp.float32),
             jnp.full(rows, n, jnp.int32), jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool),
             jnp.zeros(rows, jnp.float32), first_cuts)
    # Inside ``shard_map`` every carry varies over the mesh axes the scores vary over.
    start = vary(start, axes)
    _, _, lo, _, c_lo, _, hit, cut, _ = lax.while_loop(
        lambda carry: jnp.any(active(carry)), body, start)
    cut = jnp.where(hit, cut, lo)
    # With ``cut`` reached by exactly k entries (the usual end) the masks are
    # ``x >= cut``, one pass; otherwise ``cut`` is the exact k-th largest entry and ties
    # at it are ranked.
    is_cut = hit | (c_lo == k)
    masks = lax.cond(jnp.all(is_cut), lambda: view(x) >= cut[:, None],
                     lambda: masks_at_threshold(view(x), cut, k))
    return masks, cut


def _sub_row_width(n: int) -> int:
    """The width of the sub-rows of an extraction pass on a row of ``n`` entries: the
    largest divisor of ``n`` up to ``sqrt(n) / _ROWS_PER_ROOT``; ``0`` when that is below 8
    (the row then has no extraction pass)."""
    widest = max(1, math.isqrt(n) // _ROWS_PER_ROOT)
    width = next((d for d in range(widest, 0, -1) if n % d == 0), 1)
    return width if width >= 8 else 0


def _extraction_limit(n: int, width: int) -> int:
    """Most bracket entries for which an extraction pass is tried: with ``U`` entries
    spread over ``R`` sub-rows, some sub-row holds three with probability about
    ``C(U, 3) / R**2``; this keeps it near 2%."""
    if not width:
        return 0
    return max(0, math.floor((0.12 * (n // width) ** 2) ** (1 / 3)))


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
