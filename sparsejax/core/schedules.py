"""Schedules: plain functions of the training step, usable inside ``jit``.

Each factory returns ``schedule(step) -> value`` that accepts a Python int or a traced
int32 step, like optax's schedules.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sparsejax.core.validation import check_density, check_int, check_sparsity

__all__ = [
    "Schedule",
    "constant",
    "one_shot",
    "cubic_sparsity",
    "cosine_drop_fraction",
    "is_update_step",
]

Schedule = Callable[[jax.Array | int], jax.Array]


def _check_steps(begin_step: int, end_step: int) -> None:
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}")
    if end_step <= begin_step:
        raise ValueError(f"end_step ({end_step}) must come after begin_step ({begin_step})")


def constant(value: float) -> Schedule:
    """``value`` at every step.

    >>> round(float(constant(0.9)(123)), 6)
    0.9
    """

    def schedule(step: jax.Array | int) -> jax.Array:
        del step
        return jnp.asarray(value, jnp.float32)

    return schedule


def one_shot(sparsity: float, at_step: int = 0) -> Schedule:
    """Sparsity 0 before ``at_step`` and ``sparsity`` from then on.

    >>> s = one_shot(0.9, at_step=10)
    >>> round(float(s(9)), 6), round(float(s(10)), 6)
    (0.0, 0.9)
    """
    check_sparsity(sparsity)

    def schedule(step: jax.Array | int) -> jax.Array:
        return jnp.where(jnp.asarray(step) >= at_step, jnp.float32(sparsity), jnp.float32(0))

    return schedule


def cubic_sparsity(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    *,
    initial_sparsity: float = 0.0,
    frequency: int = 1,
) -> Schedule:
    """Zhu & Gupta's gradual pruning schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` evaluated at the last
    pruning step ``t0 + j * dt <= t`` (pruning happens every ``frequency`` steps from
    ``begin_step`` to ``end_step``); ``s_i`` before ``begin_step`` and ``s_f`` after.

    >>> s = cubic_sparsity(0.9, begin_step=0, end_step=100, frequency=10)
    >>> [round(float(s(t)), 4) for t in (0, 50, 55, 100, 1000)]
    [0.0, 0.7875, 0.7875, 0.9, 0.9]
    """
    check_sparsity(final_sparsity, "final_sparsity")
    check_sparsity(initial_sparsity, "initial_sparsity")
    _check_steps(begin_step, end_step)
    check_int(frequency, "frequency (steps)", minimum=1)
    span = end_step - begin_step

    def schedule(step: jax.Array | int) -> jax.Array:
        t = jnp.clip(jnp.asarray(step, jnp.int32), begin_step, end_step) - begin_step
        t = (t // frequency) * frequency
        progress = jnp.minimum(t.astype(jnp.float32) / span, 1.0)
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3

    return schedule


def cosine_drop_fraction(initial_fraction: float = 0.3, end_step: int = 1) -> Schedule:
    """RigL's drop fraction ``alpha / 2 * (1 + cos(pi * t / T_end))``, 0 from ``end_step``.

    >>> f = cosine_drop_fraction(0.3, end_step=100)
    >>> [round(float(f(t)), 4) for t in (0, 50, 100, 200)]
    [0.3, 0.15, 0.0, 0.0]
    """
    check_density(initial_fraction, "initial_fraction")
    _check_steps(0, end_step)

    def schedule(step: jax.Array | int) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        progress = jnp.minimum(t, end_step) / end_step
        value = 0.5 * initial_fraction * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < end_step, value, 0.0).astype(jnp.float32)

    return schedule


def is_update_step(step: jax.Array | int, interval: int, *, begin_step: int = 0,
                   end_step: int | None = None) -> jax.Array | bool:
    """True on steps ``begin_step + j * interval`` (``j >= 1``) before ``end_step``; a
    Python bool for a Python int ``step`` (the host's copy of the step counter), else a
    bool array.

    >>> [is_update_step(t, 100, end_step=300) for t in (0, 100, 150, 200, 300)]
    [False, True, False, True, False]
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if not isinstance(step, int):
        step = jnp.asarray(step, jnp.int32)
    since = step - begin_step
    ok = (since > 0) & (since % interval == 0)
    if end_step is not None:
        ok = ok & (step < end_step)
    return ok
