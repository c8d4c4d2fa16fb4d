"""The rules of the prune-and-regrow engine (:mod:`sparsejax.methods.dst`): what the rules
see at an update (:class:`Signals`) and the small functions that make SET, RigL and SNFS
differ (drop and grow scores, drop counts, redistribution among leaves).

>>> import jax.numpy as jnp
>>> round_fraction(jnp.float32(0.3), jnp.array([10, 7]))
Array([3, 2], dtype=int32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import split_rows
from sparsejax.methods.draws import UniformDraw, draw_rows, draws_per_leaf

__all__ = [
    "Signals",
    "grouped",
    "RegrowRules",
    "ScoreFn",
    "DropCountFn",
    "RedistributeFn",
    "uniform_per_leaf",
    "magnitude_drop",
    "noisy_magnitude_drop",
    "random_grow",
    "gradient_grow",
    "momentum_grow",
    "round_fraction",
    "ceil_fraction",
    "same_leaf",
    "allocate",
    "momentum_redistribution",
]


class Signals(NamedTuple):
    """What the rules see at an update: lists over the *prunable* leaves, in leaf order,
    or (``rows`` set) over groups of equally large prunable leaves.

    Attributes:
      params: the current weights (inactive ones are zero).
      masks: the masks before the update.
      grads: the dense gradient of this step.
      momentum: the moving average of dense gradients, or ``None`` when not tracked.
      key: this step's PRNG key (the same on every device and on resume).
      rows: ``None``: entry ``i`` of each list is prunable leaf ``i``. Otherwise entry
        ``g`` is an array ``(len(rows[g]), size)``: the leaves ``rows[g]`` (indices in
        leaf order) flattened, one per row. The engine groups leaves so (see
        :func:`grouped`), so that its scores, searches and masks are one program per
        leaf size rather than per leaf; a rule that is elementwise works on either, and
        :meth:`per_leaf` turns per-entry (or per-row) values into a leaf-order vector.
    """

    params: list[jax.Array]
    masks: list[jax.Array]
    grads: list[jax.Array]
    momentum: list[jax.Array] | None
    key: jax.Array
    rows: tuple[tuple[int, ...], ...] | None = None

    def reduce_axes(self, x: jax.Array) -> tuple[int, ...] | None:
        """The axes a per-leaf reduction of entry ``x`` sums over (all but the rows')."""
        return None if self.rows is None else tuple(range(1, x.ndim))

    def per_leaf(self, parts: list[jax.Array]) -> jax.Array:
        """One value per leaf in leaf order, from one per entry (scalars) or, grouped, one
        per row of each entry (vectors)."""
        if self.rows is None:
            return jnp.stack(parts)
        order = np.argsort(np.concatenate([np.asarray(r, int) for r in self.rows]),
                           kind="stable")
        return jnp.concatenate(parts)[order]

    def ungroup(self, entries: list[jax.Array],
                shapes: list[tuple[int, ...]]) -> list[jax.Array]:
        """Per-leaf arrays of ``shapes`` (leaf order) from the rows of grouped
        ``entries`` (one per entry of these grouped signals)."""
        return split_rows(list(entries), [list(ids) for ids in self.rows],
                          [tuple(s) for s in shapes])

    def per_entry(self, vector: jax.Array) -> list[jax.Array]:
        """A leaf-order vector split as the entries: one value per entry, or, grouped, a
        vector per entry (its rows' values)."""
        if self.rows is None:
            return [vector[i] for i in range(vector.shape[0])]
        return [vector[np.asarray(r, int)] for r in self.rows]


def grouped(signals: Signals) -> Signals:
    """``signals`` with equally large leaves stacked as the rows of one entry each (the
    first leaf of each size decides the order of the entries); grouped signals are
    returned as they are.

    >>> import jax, jax.numpy as jnp
    >>> s = Signals([jnp.ones((2, 2)), jnp.ones(3), jnp.zeros(4)], [jnp.ones(1)] * 3,
    ...             [jnp.ones(1)] * 3, None, jax.random.PRNGKey(0))
    >>> g = grouped(s._replace(masks=s.params, grads=s.params))
    >>> g.rows, [p.shape for p in g.params]
    (((0, 2), (1,)), [(2, 4), (1, 3)])
    """
    if signals.rows is not None:
        return signals
    by_size: dict[int, list[int]] = {}
    for i, leaf in enumerate(signals.params):
        by_size.setdefault(int(leaf.size), []).append(i)
    rows = tuple(tuple(ids) for ids in by_size.values())

    def stack(leaves: list[jax.Array] | None) -> list[jax.Array] | None:
        if leaves is None:
            return None
        return [jnp.stack([jnp.ravel(leaves[i]) for i in ids]) for ids in rows]

    return Signals(stack(signals.params), stack(signals.masks), stack(signals.grads),
                   stack(signals.momentum), signals.key, rows)


ScoreFn = Callable[[Signals], list[jax.Array]]
"""``scores(signals) -> one array per entry of signals.params`` (per prunable leaf, or per
group of them), of its shape; larger means keep (drop score) or grow first (grow
score)."""
DropCountFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``drop_counts(fraction, n_active) -> n_drop``, int32 vectors over prunable leaves."""
RedistributeFn = Callable[[Signals, jax.Array, jax.Array], jax.Array]
"""``redistribute(signals, n_drop, capacity) -> n_grow``: int32 vectors over prunable
leaves with ``sum(n_grow) == sum(n_drop)`` and ``n_grow <= capacity``."""


class RegrowRules(NamedTuple):
    """The four small functions that make a prune-and-regrow method."""

    drop_scores: ScoreFn
    grow_scores: ScoreFn
    drop_counts: DropCountFn
    redistribute: RedistributeFn


# ---------------------------------------------------------------------------- rules

def uniform_per_leaf(key: jax.Array, signals: Signals) -> list[jax.Array]:
    """``U(0, 1)`` noise shaped like ``signals.params``, leaf ``i`` drawn with
    ``split(key, number of leaves)[i]`` (flattened, row-major, when grouped): the same
    numbers whether or not the signals are grouped. Grouped (as the engine hands them),
    every leaf of every size is drawn by one random-bits generator
    (:func:`sparsejax.methods.draws.draw_rows`); per-leaf signals by one per leaf shape
    (:func:`sparsejax.methods.draws.draws_per_leaf`).

    >>> import jax, jax.numpy as jnp
    >>> leaves = [jnp.ones(3), jnp.ones(3)]
    >>> s = Signals(leaves, leaves, leaves, None, jax.random.PRNGKey(0))
    >>> a, b = uniform_per_leaf(jax.random.PRNGKey(0), s)
    >>> bool(jnp.all(a == jax.random.uniform(jax.random.split(jax.random.PRNGKey(0), 2)[0],
    ...                                       (3,))))
    True
    """
    if signals.rows is None:
        return draws_per_leaf(key, [p.shape for p in signals.params], UniformDraw())
    # grouped: each entry's rows drawn at once, already stacked as the entry is, every
    # entry by one generator (draw_rows)
    keys = jax.random.split(key, sum(len(r) for r in signals.rows))
    return draw_rows(UniformDraw(), [keys[np.asarray(r, int)] for r in signals.rows],
                     [p.shape[1] for p in signals.params])


def magnitude_drop(signals: Signals) -> list[jax.Array]:
    """Drop score ``|w|``: the smallest active weights are dropped (SET, SNFS)."""
    return [jnp.abs(p).astype(jnp.float32) for p in signals.params]


def noisy_magnitude_drop(noise: float = 1e-6) -> ScoreFn:
    """Drop score ``|w| + u``, ``u ~ U(0, noise)`` keyed by step: RigL's tie-breaking
    (many weights sit at exactly zero right after they are grown)."""

    def scores(signals: Signals) -> list[jax.Array]:
        draws = uniform_per_leaf(jax.random.fold_in(signals.key, 1), signals)
        return [jnp.abs(p).astype(jnp.float32) + noise * u
                for u, p in zip(draws, signals.params, strict=True)]

    return scores


def random_grow(signals: Signals) -> list[jax.Array]:
    """Grow score: uniform random, keyed by step (SET)."""
    return uniform_per_leaf(jax.random.fold_in(signals.key, 2), signals)


def gradient_grow(signals: Signals) -> list[jax.Array]:
    """Grow score ``|dense gradient|`` of this step (RigL)."""
    return [jnp.abs(g).astype(jnp.float32) for g in signals.grads]


def momentum_grow(signals: Signals) -> list[jax.Array]:
    """Grow score ``|momentum|``, the moving average of dense gradients (SNFS)."""
    if signals.momentum is None:
        raise ValueError("momentum_grow needs the engine to track momentum (momentum=beta)")
    return [jnp.abs(m).astype(jnp.float32) for m in signals.momentum]


def round_fraction(fraction: jax.Array, n_active: jax.Array) -> jax.Array:
    """``floor(f * n_active + 0.5)`` per leaf: the library's rounding (as ``num_kept``).

    >>> round_fraction(jnp.float32(0.3), jnp.array([10, 5]))
    Array([3, 2], dtype=int32)
    """
    n = n_active.astype(jnp.float32)
    return jnp.clip(jnp.floor(fraction * n + 0.5), 0, n).astype(jnp.int32)


def ceil_fraction(fraction: jax.Array, n_active: jax.Array) -> jax.Array:
    """``ceil(p * n_active)`` per leaf (SNFS).

    >>> ceil_fraction(jnp.float32(0.3), jnp.array([10, 5]))
    Array([3, 2], dtype=int32)
    """
    n = n_active.astype(jnp.float32)
    return jnp.clip(jnp.ceil(fraction * n), 0, n).astype(jnp.int32)


def same_leaf(signals: Signals, n_drop: jax.Array, capacity: jax.Array) -> jax.Array:
    """Each leaf regrows what it dropped, so every leaf keeps its density (SET, RigL)."""
    del signals, capacity
    return n_drop


def allocate(total: jax.Array, weights: jax.Array, capacity: jax.Array) -> jax.Array:
    """Split the integer ``total`` among slots in proportion to ``weights``, never giving a
    slot more than its ``capacity``; the parts add up to exactly ``total`` whenever the
    capacities allow it.

    A full slot's surplus is shared again among the others (at most one pass per slot);
    the units left by rounding down go to the first slots with room. All-zero weights
    share in proportion to the room left.

    >>> allocate(jnp.int32(10), jnp.array([1.0, 1.0, 2.0]), jnp.array([100, 1, 100]))
    Array([3, 1, 6], dtype=int32)
    """
    total = jnp.asarray(total, jnp.int32)
    capacity = jnp.asarray(capacity, jnp.int32)
    weights = jnp.maximum(jnp.asarray(weights, jnp.float32), 0.0)

    def one_pass(_: Any, alloc: jax.Array) -> jax.Array:
        remaining = total - jnp.sum(alloc)
        room = capacity - alloc
        w = jnp.where(room > 0, weights, 0.0)
        w = jnp.where(jnp.sum(w) > 0, w, room.astype(jnp.float32))
        share = w / jnp.maximum(jnp.sum(w), 1e-30)
        add = jnp.minimum(jnp.floor(share * remaining.astype(jnp.float32)).astype(jnp.int32),
                          room)
        add = jnp.clip(remaining - (jnp.cumsum(add) - add), 0, add)
        return alloc + add

    # a loop, not unrolled: one pass per slot would make the program grow with the leaves
    alloc = jax.lax.fori_loop(0, int(capacity.shape[0]), one_pass, jnp.zeros_like(capacity))
    remaining = total - jnp.sum(alloc)
    room = capacity - alloc
    return alloc + jnp.clip(remaining - (jnp.cumsum(room) - room), 0, room)


def momentum_redistribution(signals: Signals, n_drop: jax.Array,
                            capacity: jax.Array) -> jax.Array:
    """SNFS: each leaf's share of the regrowth is the mean ``|momentum|`` of its active
    weights, normalised over leaves; capped by what each leaf can hold, exact in total."""
    if signals.momentum is None:
        raise ValueError("momentum_redistribution needs the engine to track momentum")
    means = signals.per_leaf([
        jnp.sum(jnp.where(m, jnp.abs(g), 0.0), axis=signals.reduce_axes(m))
        / jnp.maximum(jnp.sum(m, axis=signals.reduce_axes(m)), 1).astype(jnp.float32)
        for m, g in zip(signals.masks, signals.momentum, strict=True)
    ])
    return allocate(jnp.sum(n_drop), means, capacity)
