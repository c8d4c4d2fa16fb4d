"""Exact top-k masks without sorting.

``topk_mask`` keeps exactly ``num_kept(density, size)`` entries with the largest scores,
per leaf or jointly across leaves. Scores are ranked through an order-preserving uint32
image of their float32 values (the *keys*), and the mask is ``key >= t`` for a cut ``t``
found by counting, never by sorting: each pass over the scores counts the keys at or
above a few candidate cuts, which is linear in the number of scores and much faster than
``jnp.sort`` or ``lax.top_k`` on CPU (see docs/design.md and benchmarks/topk.py).

* Small groups (at most ``_SAMPLE_SIZE`` scores) use a bitwise binary search: 32
  passes, one bit of the k-th largest key per pass.
* Larger groups start from two cuts: order statistics of a strided sample of
  ``_SAMPLE_SIZE`` scores, or (:func:`topk_mask_tracked`) either side of the previous
  call's cut. Each later pass counts float32 values at two cuts interpolated from the
  counts of the current bracket, and the search stops as soon as one cut keeps exactly
  ``k``. A pass usually shrinks the number of scores left in the bracket from ``U`` to
  about ``sqrt(U)``; once few are left, one extraction pass (each row's largest and
  smallest entry inside the bracket) usually recovers all of them. After
  ``_INTERPOLATION_ROUNDS`` passes it bisects the bracket, so adversarial scores (mass
  ties, spikes) cost at most 40 passes in all. Whatever the data, the result is exact: a
  pass only ever narrows a bracket that provably holds the k-th largest score.

Ties at the k-th largest score are broken deterministically: the entries that come first
(in leaf order, then row-major order) are kept.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.validation import check_density, check_finite, check_same_structure, is_concrete

__all__ = ["num_kept", "topk_mask", "topk_mask_tracked", "kth_largest"]

Scope = Literal["layer", "global"]

_SIGN_BIT = 0x80000000
_SAMPLE_SIZE = 2048
"""Groups up to this size are searched bitwise; larger ones seed their search with a
strided sample of about this many keys."""
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
"""An extraction pass views a leaf of ``n`` entries as about ``8 * sqrt(n)`` rows of
about ``sqrt(n) / 8`` entries (see ``_row_views``)."""
_ENDGAME = 3
"""When at most this many entries are left in the bracket, one pass finds its lowest and
highest entries and the next counts just above the lowest and at the highest."""
_INTERPOLATION_ROUNDS = 8
"""Passes that place cuts by interpolation before the search falls back to bisection."""
_EXACT_FLOAT_COUNT = 2**24
"""Counts of up to this many entries are exact as float32 sums (see ``_count``)."""


def num_kept(density: Any, size: int) -> Any:
    """How many of ``size`` entries a ``density`` keeps: ``floor(density * size + 0.5)``.

    This is the one rounding rule of the library (round half up). With a Python float it
    returns a Python int computed in double precision; with a traced density an int32.

    >>> num_kept(0.5, 5), num_kept(0.1, 235200)
    (3, 23520)
    """
    if is_concrete(density) and not isinstance(density, jax.Array):
        return int(min(size, max(0, math.floor(float(density) * size + 0.5))))
    k = jnp.floor(jnp.asarray(density, jnp.float32) * size + 0.5)
    return jnp.clip(k, 0, size).astype(jnp.int32)


def _order_key(scores: jax.Array) -> jax.Array:
    """uint32 keys with the same order as the float32 ``scores`` (``-0.0``, and subnormals,
    equal to ``0.0``)."""
    x = _zero_subnormals(jnp.asarray(scores).astype(jnp.float32))
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits & jnp.uint32(_SIGN_BIT)) != 0
    # Non-negative floats: set the sign bit so they sort above all negatives. Negative
    # floats: flip every bit so that larger magnitudes come first.
    return jnp.where(negative, ~bits, bits | jnp.uint32(_SIGN_BIT))


def _kth_largest_keys(groups: Sequence[Sequence[jax.Array]], ks: Sequence[Any]) -> list[jax.Array]:
    """For each group of key arrays, its ``ks[g]``-th largest value (1-based), all found
    in one loop of 32 counting passes.

    Builds each answer from the most significant bit down: a bit is set when at least
    ``k`` keys of the group are >= the candidate with that bit set. Searching every group
    in the same loop (rather than one loop per leaf) lets XLA fuse the counts of a pass.
    """

    def body(i: jax.Array, answers: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        bit = jnp.left_shift(jnp.uint32(1), (31 - i).astype(jnp.uint32))
        updated = []
        for keys, k, answer in zip(groups, ks, answers, strict=True):
            candidate = answer | bit
            count = sum((_count(key >= candidate) for key in keys), jnp.int32(0))
            updated.append(jnp.where(count >= k, candidate, answer))
        return tuple(updated)

    # Inside ``shard_map`` the carries must vary over the mesh axes the keys vary over.
    start = _vary(tuple(jnp.uint32(0) for _ in groups), _varying_axes(groups, list(ks)))
    return list(lax.fori_loop(0, 32, body, start))


def _masks_at_threshold(keys: Sequence[jax.Array], threshold: jax.Array,
                        k: Any) -> list[jax.Array]:
    """Masks keeping exactly ``k`` of ``keys`` (order keys, or float32 values, which
    compare alike) given their exact k-th largest value."""
    above = [key > threshold for key in keys]
    n_above = sum((_count(a) for a in above), jnp.int32(0))
    ties = [key == threshold for key in keys]
    n_ties = sum((_count(t) for t in ties), jnp.int32(0))
    ties_needed = jnp.asarray(k, jnp.int32) - n_above

    def keep_all_ties(_: None) -> list[jax.Array]:
        return [a | t for a, t in zip(above, ties, strict=True)]

    def keep_first_ties(_: None) -> list[jax.Array]:
        masks, offset = [], jnp.int32(0)
        for a, t in zip(above, ties, strict=True):
            # jnp.cumsum, not lax.associative_scan: the scan runs 4x faster on CPU but
            # adds seconds to every compile, for a branch that rarely runs.
            rank = jnp.cumsum(t.ravel(), dtype=jnp.int32).reshape(t.shape) + offset
            masks.append(a | (t & (rank <= ties_needed)))
            offset = offset + _count(t)
        return masks

    # The cumulative sum that ranks ties costs several counting passes, so it runs only
    # when more entries tie at the threshold than may be kept.
    masks = lax.cond(n_ties > ties_needed, keep_first_ties, keep_all_ties, None)
    keep_none = jnp.asarray(k) <= 0
    return [jnp.where(keep_none, False, m) for m in masks]


def _count(flags: jax.Array) -> jax.Array:
    """The number of ``True`` entries of a boolean array, as int32, exactly.

    Summing 1.0s in float32 runs about twice as fast on CPU as summing the booleans as
    int32 (measured: 37 against 84 us for 235,200 entries), and is exact in any order of
    addition while every partial sum stays at or below 2**24; larger arrays are counted in
    slices of 2**24 entries whose counts are added as int32.
    """
    flat = flags.ravel()
    total = jnp.int32(0)
    for start in range(0, max(int(flat.size), 1), _EXACT_FLOAT_COUNT):
        part = flat[start:start + _EXACT_FLOAT_COUNT]
        total = total + jnp.sum(jnp.where(part, jnp.float32(1), jnp.float32(0))).astype(jnp.int32)
    return total


def _count_at_least(values: Sequence[jax.Array], cut: jax.Array) -> jax.Array:
    return sum((_count(v >= cut) for v in values), jnp.int32(0))


def _strided_sample(values: Sequence[jax.Array], size: int) -> jax.Array:
    """Every ``stride``-th entry of each leaf (one stride for the group), about ``size``
    in all: a systematic sample whose order statistics track the group's."""
    stride = max(1, sum(int(v.size) for v in values) // size)
    return jnp.concatenate([v.ravel()[::stride] for v in values])


_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def _zero_subnormals(x: jax.Array) -> jax.Array:
    """``x`` with subnormal values and ``-0.0`` replaced by ``+0.0``. XLA's CPU backend
    compares float32 subnormals as zero, so a search must see them flushed in every pass
    (and step over them in :func:`_above` / :func:`_below`), or its counts disagree with
    its cuts: ``x >= nextafter(0, inf)`` held for every zero, and a 5,000-entry top-k of
    zeros kept nothing. Flushed everywhere, the ranking is the same on every backend."""
    return jnp.where(jnp.abs(x) < _FLOAT32_TINY, jnp.float32(0), x)


def _zero_subnormals_abs(x: jax.Array) -> jax.Array:
    return _zero_subnormals(jnp.abs(x))


def _above(x: jax.Array) -> jax.Array:
    """The next float32 above ``x``, skipping the subnormals (which compare as zero, see
    :func:`_zero_subnormals`): above ``0`` comes the smallest normal, above ``-tiny`` zero."""
    return jnp.where(x == 0, jnp.float32(_FLOAT32_TINY),
                     jnp.where(x == -_FLOAT32_TINY, jnp.float32(0),
                               jnp.nextafter(x, jnp.float32(jnp.inf))))


def _below(x: jax.Array) -> jax.Array:
    """The next float32 below ``x``, skipping the subnormals (see :func:`_above`)."""
    return jnp.where(x == 0, jnp.float32(-_FLOAT32_TINY),
                     jnp.where(x == _FLOAT32_TINY, jnp.float32(0),
                               jnp.nextafter(x, jnp.float32(-jnp.inf))))


def _identity(x: jax.Array) -> jax.Array:
    return x


def _sampled_cut(values: Sequence[jax.Array], k: Any,
                 hint: jax.Array | None = None,
                 view: Callable[[jax.Array], jax.Array] = _identity,
                 ) -> tuple[jax.Array, jax.Array]:
    """``(cut, is_cut)`` for a large group of float32 leaves: with ``is_cut`` exactly
    ``k`` entries are ``>= cut``; otherwise (a tie straddles the k-th largest entry)
    ``cut`` is the exact k-th largest entry.

    The loop keeps a bracket ``lo <= (k-th largest) <= hi`` with its counts
    ``c_lo = #(x >= lo) >= k`` and ``c_above = #(x > hi) < k``, and every pass only
    narrows it, so it can only end exact. A pass counts at two cuts; or, once at most
    ``extract_limit`` entries are left in the bracket, extracts them row by row; or
    (when the group has no rows view and at most ``_ENDGAME`` are left, or a bracket end
    is still infinite) finds the bracket's extreme entries, after which cuts just above
    the lowest and at the highest settle it.

    ``hint``, ``[previous cut, how far it last moved]``, replaces the sample's first two
    cuts by two cuts around the previous one (see :func:`topk_mask_tracked`).

    ``view`` (e.g. ``jnp.abs``) ranks ``view(values)`` instead, applied inside every pass
    so that XLA fuses it into the pass rather than writing a transformed copy first.
    """
    n = sum(int(v.size) for v in values)
    k = jnp.asarray(k, jnp.int32)
    kf = k.astype(jnp.float32)

    def sample_cuts():
        sample = view(_strided_sample(values, _SAMPLE_SIZE))
        share = jnp.clip(kf / n, 0.0, 1.0)
        expected_rank = kf * sample.size / n
        spread = jnp.sqrt(sample.size * share * (1.0 - share)) + 1.0
        ranks = [jnp.clip(jnp.round(expected_rank + z * spread), 1, sample.size)
                 .astype(jnp.int32) for z in (-_SAMPLE_SPREADS, _SAMPLE_SPREADS)]
        return _key_value(jnp.stack(_kth_largest_keys([[_order_key(sample)]] * 2, ranks)))

    if hint is None:
        first_cuts = sample_cuts()
    else:
        previous, moved = hint[0], hint[1]
        width = jnp.maximum(_HINT_SPREADS * moved, jnp.abs(previous) * _HINT_FLOOR)
        usable = jnp.isfinite(previous) & jnp.isfinite(width) & (width > 0)
        axes = _varying_axes(values, k, hint)
        first_cuts = lax.cond(
            usable, lambda: _vary(jnp.stack([previous - width, previous + width]), axes),
            lambda: _vary(sample_cuts(), axes))

    def interpolated_cuts(lo, hi, c_lo, c_above):
        # Model the bracket's entries as uniform in value between lo and hi. The cut lies
        # above the ``c_lo - k`` lowest of its ``inside`` entries, expected at
        # ``(c_lo - k + 1/2) / (inside + 1)`` of the way up, with the spread of that order
        # statistic: one cut a spread below, one a spread above.
        inside = jnp.maximum(c_lo - c_above, 1).astype(jnp.float32)
        center = jnp.clip((c_lo - kf + 0.5) / (inside + 1.0), 0.0, 1.0)
        spread = _CUT_SPREADS * jnp.sqrt(center * (1.0 - center) / (inside + 2.0))
        shares = jnp.clip(jnp.stack([center - spread, center + spread]), 0.0, 1.0)
        cuts = jnp.clip(lo + (hi - lo) * shares, _above(lo), hi)
        # Infinite bracket ends give no usable value: bisect the keys instead.
        return jnp.where(jnp.isfinite(cuts), cuts, bisected_cuts(lo, hi))

    def bisected_cuts(lo, hi):
        lo_key, hi_key = _order_key(lo), _order_key(hi)
        third = (hi_key - lo_key) // jnp.uint32(3)
        keys = jnp.stack([lo_key + third + jnp.uint32(1), lo_key + 2 * third + jnp.uint32(1)])
        return _key_value(jnp.minimum(keys, hi_key))

    def count_pass(carry):
        lo, hi, c_lo, c_above, hit, cut, cuts = carry
        viewed = [view(v) for v in values]
        for j in range(2):
            t = cuts[j]
            count = _count_at_least(viewed, t)
            exact = (count == k) & ~hit
            cut = jnp.where(exact, t, cut)
            hit = hit | exact
            raise_lo = (count > k) & (t > lo)
            lo, c_lo = jnp.where(raise_lo, t, lo), jnp.where(raise_lo, count, c_lo)
            lower_hi = (count < k) & (_below(t) < hi)
            hi, c_above = jnp.where(lower_hi, _below(t), hi), jnp.where(lower_hi, count, c_above)
        return lo, hi, c_lo, c_above, hit, cut, cuts

    def extremes_pass(carry):
        lo, hi, c_lo, c_above, hit, cut, _ = carry
        viewed = [view(v) for v in values]
        # The bracket's lowest and highest finite entries, and the counts at them. No
        # entry lies in [lo, bottom) or (top, hi] but infinities, which are the k-th
        # largest entry only when the counts say so (masked scores of -inf, say).
        top = functools.reduce(jnp.maximum, [
            jnp.max(jnp.where((v <= hi) & (v < jnp.inf), v, -jnp.inf)) for v in viewed])
        bottom = functools.reduce(jnp.minimum, [
            jnp.min(jnp.where((v >= lo) & (v > -jnp.inf), v, jnp.inf)) for v in viewed])
        c_bottom = _count_at_least(viewed, bottom)
        c_over_top = _count_at_least(viewed, _above(top))
        minus_inf = c_bottom < k  # only -inf entries below bottom: the answer is -inf
        plus_inf = c_over_top >= k  # only +inf entries above top: the answer is +inf
        new_lo = jnp.where(minus_inf, lo, jnp.where(plus_inf, jnp.inf, jnp.maximum(lo, bottom)))
        new_hi = jnp.where(plus_inf, hi, jnp.where(minus_inf, -jnp.inf, jnp.minimum(hi, top)))
        # #(x >= +inf) is c_over_top and #(x > -inf) is c_bottom.
        c_lo = jnp.where(minus_inf, c_lo, jnp.where(plus_inf, c_over_top, c_bottom))
        c_above = jnp.where(minus_inf, c_bottom, jnp.where(plus_inf, c_above, c_over_top))
        return (new_lo, new_hi, c_lo, c_above, hit, cut,
                jnp.stack([_above(new_lo), new_hi]))

    rows = _row_views(values)
    extract_limit = _extraction_limit(rows)

    def extraction_pass(carry):
        lo, hi, c_lo, c_above, hit, cut, cuts = carry
        if not rows:  # never chosen (extract_limit is 0)
            return carry
        # Every row's largest and smallest entry inside the bracket. When no row holds
        # more than two of the bracket's entries, and no row two equal ones, these are
        # all of them, and the k-th largest is found among them on the spot.
        highs, lows, found = [], [], jnp.int32(0)
        for v in rows:
            v = view(v)
            inside = (v >= lo) & (v <= hi)
            high = jnp.max(jnp.where(inside, v, -jnp.inf), axis=1)
            low = jnp.min(jnp.where(inside, v, jnp.inf), axis=1)
            has_high, has_low = high >= lo, low < high
            highs.append(jnp.where(has_high, high, -jnp.inf))
            lows.append(jnp.where(has_low, low, -jnp.inf))
            found = found + _count(has_high) + _count(has_low)
        entries = jnp.concatenate(highs + lows)
        complete = found == c_lo - c_above
        rank = jnp.clip(k - c_above, 1, entries.size)
        value = _key_value(_kth_largest_keys([[_order_key(entries)]], [rank])[0])
        # Entries at or above the answer: those above the bracket plus those extracted.
        reached = c_above + _count(entries >= value)
        return (jnp.where(complete, value, lo), jnp.where(complete, value, hi),
                jnp.where(complete, reached, c_lo), c_above, hit, cut, cuts)

    def not_done(carry):
        rounds, _, lo, hi, _, _, hit, _, _ = carry
        return (~hit) & (lo < hi) & (rounds < _INTERPOLATION_ROUNDS + 40)

    def body(carry):
        rounds, tight, *state = carry
        lo, hi, c_lo, c_above = state[:4]
        inside = c_lo - c_above
        open_end = jnp.isinf(lo) | jnp.isinf(hi)
        # Few entries left: extract them (when the rows allow it), or else find the
        # bracket's extremes and count next to them. The extremes pass also closes an
        # open bracket end (the sample's cuts all fell on one side).
        extract = ~tight & ~open_end & (inside <= extract_limit)
        few = ~extract & (inside <= _ENDGAME)
        extremes = ~tight & (few | open_end)
        branch = jnp.where(extract, 2, jnp.where(extremes, 1, 0))
        state = lax.switch(branch, [count_pass, extremes_pass, extraction_pass], tuple(state))
        lo, hi, c_lo, c_above, hit, cut, cuts = state
        rounds = rounds + 1
        # Scalar arithmetic: computing both costs less than a branch.
        placed = jnp.where(rounds < _INTERPOLATION_ROUNDS,
                           interpolated_cuts(lo, hi, c_lo, c_above), bisected_cuts(lo, hi))
        # After an extremes pass on few entries, count just above the lowest and at the
        # highest (the cuts it returned). A failed extraction is not retried at once.
        cuts = jnp.where(extremes & few, cuts, placed)
        return rounds, extremes | extract, lo, hi, c_lo, c_above, hit, cut, cuts

    # Start "tight" so that the first pass counts at the sample's cuts.
    start = (jnp.int32(0), jnp.asarray(True), jnp.float32(-jnp.inf), jnp.float32(jnp.inf),
             jnp.int32(n), jnp.int32(0), jnp.asarray(False), jnp.float32(0), first_cuts)
    # Inside ``shard_map`` every carry varies over the mesh axes the values vary over.
    start = _vary(start, _varying_axes(values, k, hint))
    _, _, lo, _, c_lo, _, hit, cut, _ = lax.while_loop(not_done, body, start)
    # A bracket closed on an entry that exactly k entries reach is a cut too.
    return jnp.where(hit, cut, lo), hit | (c_lo == k)


def _row_views(values: Sequence[jax.Array]) -> list[jax.Array]:
    """Each leaf as a 2-D array of about ``_ROWS_PER_ROOT * sqrt(size)`` rows (the width
    is the largest divisor of the size up to ``sqrt(size) / _ROWS_PER_ROOT``); a leaf
    without a width of at least 8 leaves the group without rows views (``[]``)."""
    views = []
    for v in values:
        n = int(v.size)
        widest = max(1, math.isqrt(n) // _ROWS_PER_ROOT)
        width = next((d for d in range(widest, 0, -1) if n % d == 0), 1)
        if width < 8:
            return []
        views.append(v.reshape(n // width, width))
    return views


def _extraction_limit(rows: Sequence[jax.Array]) -> int:
    """Most bracket entries for which an extraction pass is tried: with ``U`` entries
    spread over ``R`` rows, some row holds three with probability about
    ``C(U, 3) / R**2``; this keeps it near 2%."""
    total_rows = sum(int(v.shape[0]) for v in rows)
    if not total_rows:
        return 0
    return max(0, math.floor((0.12 * total_rows**2) ** (1 / 3)))


def _vma(x: Any) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) that ``x`` varies over; empty
    elsewhere."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(vma or ())


def _varying_axes(*trees: Any) -> tuple:
    """The manual mesh axes that any leaf of ``trees`` varies over, in a fixed order."""
    axes: set = set()
    for leaf in jax.tree_util.tree_leaves(trees):
        axes |= _vma(leaf)
    return tuple(sorted(axes, key=str))


def _vary(tree: Any, axes: tuple) -> Any:
    """``tree`` with every leaf made varying over ``axes`` (a no-op outside ``shard_map``):
    loop carries and branch results built from constants must match the type of what
    the loop body computes from the per-device scores (``check_vma``)."""
    if not axes:
        return tree

    def one(x: Any) -> Any:
        missing = tuple(a for a in axes if a not in _vma(x))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(one, tree)


def _explicit_sharding(x: Any) -> Any:
    """The sharding in the type of ``x`` when it shards some axis explicitly (under
    ``jit``, on an ``Explicit`` mesh), else ``None``."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(p is None for p in spec):
        return None
    return sharding


def _replicated(x: Any) -> Any:
    """``x`` resharded to replicated if its type shards it explicitly (else ``x``)."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return x
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def _key_value(key: jax.Array) -> jax.Array:
    """The float32 whose order key is ``key`` (the inverse of ``_order_key``)."""
    negative = (key & jnp.uint32(_SIGN_BIT)) == 0
    bits = jnp.where(negative, ~key, key & jnp.uint32(~_SIGN_BIT & 0xFFFFFFFF))
    return lax.bitcast_convert_type(bits, jnp.float32)


def _grouped_topk(groups: Sequence[Sequence[jax.Array]], ks: Sequence[Any],
                  hints: jax.Array | None = None,
                  by_magnitude: bool = False) -> tuple[list[list[jax.Array]], jax.Array]:
    """For each group of leaves, masks keeping exactly ``ks[g]`` of its largest entries
    jointly (one group per leaf: per-layer top-k; one group of all leaves: global), and
    the new hints, ``[cut, how far it moved]`` per group (shape ``(groups, 2)``).

    Small groups share one bitwise search (one loop for all of them, so XLA fuses their
    counts); each large group runs its own sampled search on float32 values (which
    compare like their keys, and count faster on CPU), started from ``hints[g]`` if given.
    ``by_magnitude`` ranks the absolute values.
    """
    ranked = _zero_subnormals_abs if by_magnitude else _zero_subnormals
    small = [g for g, group in enumerate(groups)
             if sum(int(jnp.size(leaf)) for leaf in group) <= _SAMPLE_SIZE]
    masks: list[list[jax.Array]] = [[] for _ in groups]
    new_hints: list[jax.Array] = [jnp.zeros(2, jnp.float32) for _ in groups]
    if small:
        keys = [[_order_key(ranked(leaf)) for leaf in groups[g]] for g in small]
        thresholds = _kth_largest_keys(keys, [ks[g] for g in small])
        for g, group_keys, threshold in zip(small, keys, thresholds, strict=True):
            masks[g] = _masks_at_threshold(group_keys, threshold, ks[g])
            new_hints[g] = jnp.stack([_key_value(threshold), jnp.float32(0)])
    for g, group in enumerate(groups):
        if g in small:
            continue
        values = [jnp.asarray(leaf).astype(jnp.float32) for leaf in group]
        hint = None if hints is None else hints[g]
        cut, is_cut = _sampled_cut(values, ks[g], hint, ranked)
        masks[g] = lax.cond(
            is_cut,
            lambda v=values, c=cut: [ranked(x) >= c for x in v],
            lambda v=values, c=cut, k=ks[g]: _masks_at_threshold([ranked(x) for x in v], c, k))
        moved = jnp.float32(0) if hint is None else jnp.abs(cut - hint[0])
        new_hints[g] = jnp.stack([cut, jnp.where(jnp.isfinite(moved), moved, 0.0)])
    return masks, jnp.stack(new_hints)


def kth_largest(scores: jax.Array, k: Any) -> jax.Array:
    """The exact k-th largest entry of ``scores`` (1-based), as float32, without sorting.

    >>> import jax.numpy as jnp
    >>> float(kth_largest(jnp.array([0.3, -1.0, 2.0, 0.5]), 2))
    0.5
    """
    return _kth_largest_compiled(jnp.asarray(scores), _as_int32(k))


@jax.jit
def _kth_largest_compiled(scores: jax.Array, k: jax.Array) -> jax.Array:
    return _key_value(_kth_largest_keys([[_order_key(scores)]], [k])[0])


def topk_mask(
    scores: Any,
    density: Any = None,
    *,
    count: Any = None,
    scope: Scope = "layer",
    check_finite_scores: bool = True,
    by_magnitude: bool = False,
) -> Any:
    """Boolean mask(s) keeping exactly ``num_kept(density, size)`` (or ``count``) of the
    largest scores.

    Args:
      scores: an array or a pytree of arrays (any real dtype; ranked as float32).
      density: the fraction to keep, in [0, 1]. With ``scope='layer'`` either one number
        for every leaf or a pytree of numbers with the structure of ``scores``; with
        ``scope='global'`` one number for all leaves together.
      count: instead of ``density``, how many entries to keep: an integer (or int array,
        traced or not) per leaf, a tree of them, or one for all leaves with
        ``scope='global'``. Exact for leaves of any size, where a float32 density cannot
        name every count above 2**24 entries. Concrete counts outside [0, size] are an
        error; traced ones are clipped to [0, size].
      scope: ``'layer'`` keeps the top fraction of each leaf; ``'global'`` ranks all
        leaves jointly and keeps ``num_kept(density, total size)`` entries.
      check_finite_scores: raise ``ValueError`` for NaN or inf scores. Under ``jit`` the
        check runs on the device and reports through a host callback.
      by_magnitude: rank by ``|score|``: the masks of ``topk_mask(abs(scores))``, with the
        absolute values taken inside each counting pass instead of written out as a copy
        of the scores first (Edge-Popup ranks its scores this way every step).

    Returns:
      Boolean arrays with the structure and shapes of ``scores``. Ties at the threshold
      keep the entries that come first (leaf order, then row-major order). Subnormal
      scores rank as zero, as XLA compares them.

    Sharding: inside ``jax.shard_map`` each device ranks its own block of the scores, so
    the top-k (and ``scope='global'``) is per shard: every block keeps exactly
    ``num_kept(density, block size)`` entries, as if ``topk_mask`` ran on each block
    apart. Under ``jit`` on explicitly sharded scores (an ``Explicit`` mesh axis) the
    top-k is global across shards, bitwise equal to the unsharded result: the search
    runs on a replicated copy of the scores and the masks keep the scores' shardings.

    >>> import jax.numpy as jnp
    >>> topk_mask(jnp.array([0.1, 0.9, 0.5, 0.9]), 0.5)
    Array([False,  True, False,  True], dtype=bool)
    >>> topk_mask(jnp.array([1.0, 1.0, 1.0, 1.0]), 0.5)  # ties: first entries win
    Array([ True,  True, False, False], dtype=bool)
    >>> topk_mask(jnp.array([0.1, 0.9, 0.5, 0.9]), count=3)
    Array([False,  True,  True,  True], dtype=bool)
    >>> topk_mask(jnp.array([0.1, -0.9, 0.5, 0.2]), 0.5, by_magnitude=True)
    Array([False,  True,  True, False], dtype=bool)
    """
    return _topk(scores, density, count, scope, check_finite_scores, None, by_magnitude)[0]


def topk_mask_tracked(
    scores: Any,
    density: Any = None,
    cuts: jax.Array | None = None,
    *,
    count: Any = None,
    scope: Scope = "layer",
    check_finite_scores: bool = True,
    by_magnitude: bool = False,
) -> tuple[Any, jax.Array]:
    """:func:`topk_mask` for scores that change a little between calls (a per-step top-k
    in training): returns ``(masks, cuts)``; pass ``cuts`` to the next call.

    ``cuts`` has one row ``[cut, how far it moved]`` per group (per leaf, or one for
    ``scope='global'``). The next search starts with two cuts around the previous one
    instead of cuts from a sample: on Edge-Popup's scores only a few entries cross the
    cut between steps, so the first pass brackets a handful of entries and an extraction
    pass settles them. The masks are exactly those of :func:`topk_mask` whatever
    ``cuts`` holds; only the time changes. With ``by_magnitude`` the cuts are on
    ``|score|``.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (100, 100))
    >>> masks, cuts = topk_mask_tracked(x, 0.3)
    >>> masks2, cuts = topk_mask_tracked(x + 1e-4, 0.3, cuts)
    >>> bool(jnp.all(masks == masks2)), cuts.shape
    (True, (1, 2))
    """
    return _topk(scores, density, count, scope, check_finite_scores, cuts, by_magnitude)


def _topk(scores: Any, density: Any, count: Any, scope: str, check_finite_scores: bool,
          hints: jax.Array | None, by_magnitude: bool = False) -> tuple[Any, jax.Array]:
    """``(masks, new hints)``: the argument checks and grouping of :func:`topk_mask`."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if (density is None) == (count is None):
        raise ValueError("give exactly one of density and count")
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    if not leaves:
        return scores, jnp.zeros((0, 2), jnp.float32)
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"scores must be real numbers, got dtype {dtype}")
    if check_finite_scores:
        check_finite(scores, "scores")
    amount = density if count is None else count
    n_groups = 1 if scope == "global" else len(leaves)
    if hints is not None and jnp.shape(hints) != (n_groups, 2):
        raise ValueError(f"cuts must have shape ({n_groups}, 2) (one row per "
                         f"{'group' if scope == 'global' else 'leaf'}), got {jnp.shape(hints)}")

    if scope == "global":
        if jnp.ndim(amount) != 0:
            raise ValueError("scope='global' takes one density or count for all leaves")
        total = sum(int(jnp.size(leaf)) for leaf in leaves)
        masks, new_hints = _topk_compiled(leaves, [_as_int32(_kept(density, count, total))],
                                          hints, True, by_magnitude)
        return jax.tree_util.tree_unflatten(treedef, masks), new_hints

    if isinstance(amount, (int, float)) or (hasattr(amount, "ndim") and amount.ndim == 0):
        amounts = [amount] * len(leaves)
    else:
        check_same_structure(scores, amount, reference_name="scores",
                             other_name="densities" if count is None else "counts",
                             check_shapes=False)
        amounts = jax.tree_util.tree_leaves(amount)
        _check_one_amount_per_leaf(amounts, "density" if count is None else "count")
    ks = [_kept(a, None, int(jnp.size(leaf))) if count is None
          else _kept(None, a, int(jnp.size(leaf)))
          for leaf, a in zip(leaves, amounts, strict=True)]
    masks, new_hints = _topk_compiled(leaves, [_as_int32(k) for k in ks], hints, False,
                                      by_magnitude)
    return jax.tree_util.tree_unflatten(treedef, masks), new_hints


@functools.partial(jax.jit, static_argnames=("joint", "by_magnitude"))
def _topk_compiled(leaves: list[jax.Array], ks: list[jax.Array], hints: jax.Array | None,
                   joint: bool, by_magnitude: bool) -> tuple[list[jax.Array], jax.Array]:
    """:func:`_grouped_topk` of all ``leaves`` as one group (``joint``, one count in
    ``ks``) or of each leaf apart (one count per leaf); the masks in leaf order.

    Compiled at module level, once per shapes, dtypes and options, so that an eager call
    reuses the program of an earlier one (its loops and branches, built from fresh
    closures, would otherwise be traced and compiled again on every call)."""
    # Explicitly sharded scores (an ``Explicit`` mesh) are searched replicated: the
    # strided sample, the rows views and the tie ranking (a cumulative sum) reshape or
    # scan the whole array, which JAX refuses on a sharded type. The masks come back with
    # the scores' shardings, and are exactly those of the unsharded search.
    shardings = [_explicit_sharding(leaf) for leaf in leaves]
    if any(sharding is not None for sharding in shardings):
        leaves = [_replicated(leaf) for leaf in leaves]
        ks = [_replicated(k) for k in ks]
        hints = None if hints is None else _replicated(hints)
    groups = [leaves] if joint else [[leaf] for leaf in leaves]
    masks, new_hints = _grouped_topk(groups, ks, hints, by_magnitude)
    flat = [mask for group in masks for mask in group]
    flat = [mask if sharding is None else jax.sharding.reshard(mask, sharding)
            for mask, sharding in zip(flat, shardings, strict=True)]
    return flat, new_hints


def _as_int32(k: Any) -> Any:
    """A count as an int32 argument of a compiled search: a host value (exact, from
    :func:`num_kept` or a checked ``count``) as a numpy int32, so every value shares one
    program; a traced or device value cast to int32."""
    if is_concrete(k) and not isinstance(k, jax.Array):
        return np.int32(k)
    return jnp.asarray(k, jnp.int32)


def _check_one_amount_per_leaf(amounts: list[Any], what: str) -> None:
    """Raise ``ValueError`` unless each of ``amounts`` (the leaves of a tree of densities
    or counts with the structure of the scores) is one number: an array of them, say
    ``topk_mask(x, jnp.array([0.5, 0.5]))``, would otherwise fail deep in the search."""
    import chex  # imported here: the common call, one number for all leaves, needs none

    # One call for all leaves (a few microseconds); chex numbers them "input i".
    chex.assert_rank(amounts, 0, exception_type=ValueError,
                     custom_message=f"give one {what} per leaf of the scores (input i: the "
                                    f"{what} of leaf i in jax.tree_util.tree_leaves order)")


def _kept(density: Any, count: Any, size: int) -> Any:
    """The number kept of ``size`` entries: ``num_kept(density, size)`` or a checked
    ``count``."""
    if count is None:
        check_density(density)
        return num_kept(density, size)
    if is_concrete(count):
        value = float(np.asarray(count))
        if value != int(value) or not 0 <= value <= size:
            raise ValueError(f"count must be an integer in [0, {size}], got {count!r}")
        return int(value)
    if not jnp.issubdtype(jnp.result_type(count), jnp.integer):
        raise TypeError(f"count must be an integer, got dtype {jnp.result_type(count)}")
    return jnp.clip(jnp.asarray(count, jnp.int32), 0, size)
