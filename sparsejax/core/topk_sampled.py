"""The sampled top-k search: a few counting passes per call instead of 32, for a top-k
every step (:func:`sparsejax.topk_mask_tracked`: Edge-Popup, biprop).

Rows start from two cuts: order statistics of a strided sample of ``SAMPLE_SIZE``
scores, or either side of the previous call's cut (a hint). Each later pass counts at two
cuts interpolated from the counts of the current bracket, and a row stops as soon as one
cut keeps exactly ``k``. A pass usually shrinks the number of scores left in the bracket
from ``U`` to about ``sqrt(U)``; once few are left, one extraction pass (each sub-row's
largest and smallest entry inside the bracket) usually recovers all of them. After
``_INTERPOLATION_ROUNDS`` passes it bisects the bracket, so adversarial scores (mass ties,
spikes) cost at most 40 passes in all. Whatever the data, the result is exact: a pass only
ever narrows a bracket that provably holds the k-th largest score. Each row chooses its
own pass every round; a pass runs when some row chose it, and changes only the rows that
chose it, so every row follows the path it would follow alone. Its program is several
times larger than the bitwise search's (:mod:`sparsejax.core.topk_search`), one per row length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.core.topk_search import (
    FLOAT32_TINY,
    SAMPLE_SIZE,
    count,
    key_value,
    kth_largest_keys,
    masks_at_threshold,
    order_key,
    vary,
    varying_axes,
    zero_subnormals,
)

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
def above(x: jax.Array) -> jax.Array:
    """The next float32 above ``x``, skipping the subnormals (which compare as zero, see
    :func:`zero_subnormals`): above ``0`` comes the smallest normal, above ``-tiny`` zero."""
    return jnp.where(x == 0, jnp.float32(FLOAT32_TINY),
                     jnp.where(x == -FLOAT32_TINY, jnp.float32(0),
                               jnp.nextafter(x, jnp.float32(jnp.inf))))


def below(x: jax.Array) -> jax.Array:
    """The next float32 below ``x``, skipping the subnormals (see :func:`above`)."""
    return jnp.where(x == 0, jnp.float32(-FLOAT32_TINY),
                     jnp.where(x == FLOAT32_TINY, jnp.float32(0),
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
        cuts = jnp.clip(lo[:, None] + (hi - lo)[:, None] * shares, above(lo)[:, None],
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
            lower_hi = (reached < k) & (below(t) < hi)
            hi = jnp.where(lower_hi, below(t), hi)
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
        counts = count(x[:, None, :] >= jnp.stack([bottom, above(top)], axis=1)[:, :, None])
        c_bottom, c_over_top = counts[:, 0], counts[:, 1]
        minus_inf = c_bottom < k  # only -inf entries below bottom: the answer is -inf
        plus_inf = c_over_top >= k  # only +inf entries above top: the answer is +inf
        new_lo = jnp.where(minus_inf, lo, jnp.where(plus_inf, jnp.inf, jnp.maximum(lo, bottom)))
        new_hi = jnp.where(plus_inf, hi, jnp.where(minus_inf, -jnp.inf, jnp.minimum(hi, top)))
        # #(x >= +inf) is c_over_top and #(x > -inf) is c_bottom.
        c_lo = jnp.where(minus_inf, c_lo, jnp.where(plus_inf, c_over_top, c_bottom))
        c_above = jnp.where(minus_inf, c_bottom, jnp.where(plus_inf, c_above, c_over_top))
        return (new_lo, new_hi, c_lo, c_above, hit, cut,
                jnp.stack([above(new_lo), new_hi], axis=1))

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
