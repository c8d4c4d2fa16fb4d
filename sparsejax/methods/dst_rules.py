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

__all__ = [
    "Signals",
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
    """What the rules see at an update: lists over the *prunable* leaves, in leaf order.

    Attributes:
      params: the current weights (inactive ones are zero).
      masks: the masks before the update.
      grads: the dense gradient of this step.
      momentum: the moving average of dense gradients, or ``None`` when not tracked.
      key: this step's PRNG key (the same on every device and on resume).
    """

    params: list[jax.Array]
    masks: list[jax.Array]
    grads: list[jax.Array]
    momentum: list[jax.Array] | None
    key: jax.Array


ScoreFn = Callable[[Signals], list[jax.Array]]
"""``scores(signals) -> one array per prunable leaf``; larger means keep (drop score) or
grow first (grow score)."""
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

def uniform_per_leaf(key: jax.Array, leaves: list[jax.Array]) -> list[jax.Array]:
    """``U(0, 1)`` noise of each leaf's shape, leaf ``i`` drawn with ``split(key, n)[i]``.

    Leaves of one shape draw theirs in one vmapped call (the same numbers as one call per
    leaf), so the compiled program holds one random-bits generator per shape, not one
    per leaf.

    >>> import jax, jax.numpy as jnp
    >>> a, b = uniform_per_leaf(jax.random.PRNGKey(0), [jnp.ones(3), jnp.ones(3)])
    >>> bool(jnp.all(a == jax.random.uniform(jax.random.split(jax.random.PRNGKey(0), 2)[0],
    ...                                       (3,))))
    True
    """
    keys = jax.random.split(key, len(leaves))
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_shape.setdefault(tuple(leaf.shape), []).append(i)
    noise: list[Any] = [None] * len(leaves)
    for shape, members in by_shape.items():
        drawn = jax.vmap(lambda k, shape=shape: jax.random.uniform(k, shape))(
            keys[jnp.array(members)])
        for row, i in enumerate(members):
            noise[i] = drawn[row]
    return noise


def magnitude_drop(signals: Signals) -> list[jax.Array]:
    """Drop score ``|w|``: the smallest active weights are dropped (SET, SNFS)."""
    return [jnp.abs(p).astype(jnp.float32) for p in signals.params]


def noisy_magnitude_drop(noise: float = 1e-6) -> ScoreFn:
    """Drop score ``|w| + u``, ``u ~ U(0, noise)`` keyed by step: RigL's tie-breaking
    (many weights sit at exactly zero right after they are grown)."""

    def scores(signals: Signals) -> list[jax.Array]:
        draws = uniform_per_leaf(jax.random.fold_in(signals.key, 1), signals.params)
        return [jnp.abs(p).astype(jnp.float32) + noise * u
                for u, p in zip(draws, signals.params, strict=True)]

    return scores


def random_grow(signals: Signals) -> list[jax.Array]:
    """Grow score: uniform random, keyed by step (SET)."""
    return uniform_per_leaf(jax.random.fold_in(signals.key, 2), signals.params)


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
    alloc = jnp.zeros_like(capacity)
    for _ in range(int(capacity.shape[0])):
        remaining = total - jnp.sum(alloc)
        room = capacity - alloc
        w = jnp.where(room > 0, weights, 0.0)
        w = jnp.where(jnp.sum(w) > 0, w, room.astype(jnp.float32))
        share = w / jnp.maximum(jnp.sum(w), 1e-30)
        add = jnp.minimum(jnp.floor(share * remaining.astype(jnp.float32)).astype(jnp.int32),
                          room)
        add = jnp.clip(remaining - (jnp.cumsum(add) - add), 0, add)
        alloc = alloc + add
    remaining = total - jnp.sum(alloc)
    room = capacity - alloc
    return alloc + jnp.clip(remaining - (jnp.cumsum(room) - room), 0, room)


def momentum_redistribution(signals: Signals, n_drop: jax.Array,
                            capacity: jax.Array) -> jax.Array:
    """SNFS: each leaf's share of the regrowth is the mean ``|momentum|`` of its active
    weights, normalised over leaves; capped by what each leaf can hold, exact in total."""
    if signals.momentum is None:
        raise ValueError("momentum_redistribution needs the engine to track momentum")
    means = jnp.stack([
        jnp.sum(jnp.where(m, jnp.abs(g), 0.0)) / jnp.maximum(jnp.sum(m), 1).astype(jnp.float32)
        for m, g in zip(signals.masks, signals.momentum, strict=True)
    ])
    return allocate(jnp.sum(n_drop), means, capacity)
