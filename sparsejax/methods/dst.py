"""Dynamic sparse training: SET, RigL and SNFS as rules of one prune-and-regrow engine
(:mod:`sparsejax.methods.regrow`: drop the lowest drop scores among the active weights,
share the dropped total among the leaves, grow as many of the highest grow scores among
the inactive ones, zero the grown weights and their optimizer slots; its names are
re-exported here, as are the rules of :mod:`sparsejax.methods.dst_rules`).

Between updates the optimizer is ``chain(mask_gradients(), optimizer,
keep_pruned_zero())``: inactive weights stay exactly zero and their slots never
accumulate. Because inactive weights are zero in ``state.params``, the forward pass uses
the params as they are (what :func:`sparsejax.ste_mask` computes, without its masking
pass), so the gradients that reach ``update`` are dense: RigL grows by them and SNFS
keeps their moving average.

The methods differ only in their rules, which are small functions of :class:`Signals`:

====== ===================== ===================== ============================
method drop score             grow score            redistribution / drop count
====== ===================== ===================== ============================
SET    ``|w|``               uniform random        same leaf / round(f * active)
RigL   ``|w|`` + tiny noise  ``|dense gradient|``  same leaf / round(f * active)
SNFS   ``|w|``               ``|momentum|``        by mean momentum / ceil(p * active)
====== ===================== ===================== ============================

Static sparse training is :func:`sparsejax.static`; the dynamic methods start from its
random mask. The rules (:class:`Signals`, scores, counts, redistribution) live in
:mod:`sparsejax.methods.dst_rules` and are re-exported here.

Sparsity patterns (``pattern``, :mod:`sparsejax.core.patterns`): with ``'N:M'`` the start mask
keeps exactly ``N`` of every group of ``M`` in each prunable leaf (the pattern fixes the
density at ``N / M``, so ``sparsity`` must be ``1 - N / M``; the distribution is moot),
and every update keeps it so: the drop is the same leaf-wide choice of the ``n_drop``
lowest drop scores among the active weights, and each group then grows back exactly as
many as it lost, the highest grow scores among its own inactive weights
(:func:`sparsejax.core.patterns.nm_group_topk`). Regrowth therefore stays in the leaf and the
group: SNFS's redistribution among leaves does not apply under N:M. With ``'block:B'``
or ``'channel'`` the engine moves whole blocks or output channels
(:func:`regrow_masks_units`): each leaf drops the ``n_drop`` active units (blocks or
channels, counted by the drop-count rule) with the lowest summed drop score and grows as
many inactive units with the highest summed grow score, so every leaf keeps its count of
units (no redistribution among leaves here either).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.schedules import constant, cosine_drop_fraction
from sparsejax.core.validation import check_density
from sparsejax.methods import dst_rules
from sparsejax.methods.base import Method
from sparsejax.methods.dst_rules import (
    DropCountFn,  # noqa: F401  (re-exported: dst_rules.__all__)
    RedistributeFn,  # noqa: F401  (re-exported: dst_rules.__all__)
    RegrowRules,
    ScoreFn,  # noqa: F401  (re-exported: dst_rules.__all__)
    Signals,  # noqa: F401  (re-exported: dst_rules.__all__)
    allocate,  # noqa: F401  (re-exported: dst_rules.__all__)
    ceil_fraction,
    gradient_grow,
    magnitude_drop,
    momentum_grow,
    momentum_redistribution,
    noisy_magnitude_drop,
    random_grow,
    round_fraction,
    same_leaf,
)
from sparsejax.methods.registry import register_method
from sparsejax.methods.regrow import (
    MOMENTUM_KEY,  # noqa: F401  (re-exported)
    prune_and_regrow,
    regrow_masks,  # noqa: F401  (re-exported)
    regrow_masks_units,  # noqa: F401  (re-exported)
    reset_slots,  # noqa: F401  (re-exported)
)

__all__ = [
    *dst_rules.__all__,
    "prune_and_regrow",
    "regrow_masks",
    "regrow_masks_units",
    "reset_slots",
    "sparse_evolutionary",
    "rigl",
    "snfs",
]

PyTree = Any


# ---------------------------------------------------------------------------- methods

def _epoch_interval(method: str, update_every: int | None,
                    batches_per_epoch: int | None) -> int:
    if update_every is not None:
        return update_every
    if batches_per_epoch is None:
        raise ValueError(f"{method} updates the mask once per epoch by default: give "
                         "batches_per_epoch (the harness does) or update_every")
    return batches_per_epoch


def _check_end_step(method: str, end_step: int, total_steps: int | None) -> None:
    if total_steps is not None and end_step > total_steps:
        raise ValueError(f"{method}: end_step {end_step} lies beyond the end of training "
                         f"({total_steps} steps)")


def sparse_evolutionary(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float,
    distribution: str = "erdos_renyi",
    drop_fraction: float = 0.3,
    update_every: int | None = None,
    end_step: int | None = None,
    batches_per_epoch: int | None = None,
    total_steps: int | None = None,
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
    pattern: str = "unstructured",
) -> Method:
    """SET (Mocanu et al. 2018): every epoch drop ``drop_fraction`` of each leaf's active
    weights with the smallest ``|w|`` and regrow as many uniformly at random among the
    inactive ones, at zero. Erdos-Renyi layer densities by default.

    ``update_every`` defaults to ``batches_per_epoch``; ``end_step`` to ``total_steps``
    (no update after the last step), else never. ``pattern='N:M'`` keeps exactly ``N`` of
    every ``M`` throughout (see :func:`regrow_masks_units`).

    >>> import jax, jax.numpy as jnp, optax
    >>> m = sparse_evolutionary(optax.sgd(0.1), sparsity=0.75, update_every=1)
    >>> state = m.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0))
    >>> int(m.update(state, {"w": jnp.ones((4, 4))}).masks["w"].sum())
    4
    """
    check_density(drop_fraction, "drop_fraction")
    interval = _epoch_interval("set", update_every, batches_per_epoch)
    if end_step is None:
        end_step = total_steps
    else:
        _check_end_step("set", end_step, total_steps)
    rules = RegrowRules(magnitude_drop, random_grow, round_fraction, same_leaf)
    return prune_and_regrow(optimizer, rules, sparsity=sparsity, distribution=distribution,
                            update_every=interval, drop_fraction=constant(drop_fraction),
                            end_step=end_step, prunable=prunable, overrides=overrides,
                            name="set", pattern=pattern)


def rigl(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float,
    distribution: str = "erk",
    drop_fraction: float = 0.3,
    update_every: int = 100,
    end_step: int | None = None,
    total_steps: int | None = None,
    skip_optimizer_on_update: bool = True,
    tie_noise: float = 1e-6,
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
    pattern: str = "unstructured",
) -> Method:
    """RigL (Evci et al. 2020): every ``update_every`` steps until ``end_step`` drop
    ``f_t = drop_fraction / 2 * (1 + cos(pi t / end_step))`` of each leaf's active weights
    with the smallest ``|w|`` (plus ``U(0, tie_noise)`` to break ties) and grow as many
    with the largest dense-gradient magnitude; grown weights and their optimizer slots
    start at zero. ERK layer densities by default.

    ``end_step`` defaults to 75% of ``total_steps``; one of the two is required. By
    default the optimizer step is skipped on update steps, as in RigL's code.
    ``pattern='N:M'`` keeps exactly ``N`` of every ``M`` throughout (each group regrows,
    by gradient, what it lost; see :func:`regrow_masks_units`).

    >>> import jax, jax.numpy as jnp, optax
    >>> m = rigl(optax.sgd(0.1), sparsity=0.75, update_every=1, end_step=10)
    >>> state = m.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0))
    >>> grads = {"w": jnp.arange(16.0).reshape(4, 4)}
    >>> new = m.update(state, grads).masks["w"]
    >>> bool(new[3, 3]), int(new.sum())  # the largest gradient grows; count unchanged
    (True, 4)
    """
    check_density(drop_fraction, "drop_fraction")
    if tie_noise < 0:
        raise ValueError(f"tie_noise must be >= 0, got {tie_noise}")
    if end_step is None:
        if total_steps is None:
            raise ValueError("rigl needs end_step or total_steps (end_step defaults to 75% "
                             "of training)")
        end_step = max(1, int(0.75 * total_steps))
    _check_end_step("rigl", end_step, total_steps)
    drop = noisy_magnitude_drop(tie_noise) if tie_noise > 0 else magnitude_drop
    rules = RegrowRules(drop, gradient_grow, round_fraction, same_leaf)
    return prune_and_regrow(optimizer, rules, sparsity=sparsity, distribution=distribution,
                            update_every=update_every,
                            drop_fraction=cosine_drop_fraction(drop_fraction, end_step),
                            end_step=end_step, skip_optimizer_on_update=skip_optimizer_on_update,
                            prunable=prunable, overrides=overrides, name="rigl",
                            pattern=pattern)


def snfs(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float,
    distribution: str = "erk",
    prune_rate: float = 0.5,
    final_prune_rate: float = 0.005,
    momentum: float = 0.9,
    update_every: int | None = None,
    end_step: int | None = None,
    batches_per_epoch: int | None = None,
    total_steps: int | None = None,
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
    pattern: str = "unstructured",
) -> Method:
    """SNFS, sparse momentum (Dettmers & Zettlemoyer 2019): every epoch prune
    ``ceil(p * active)`` smallest-``|w|`` weights of each leaf, with ``p`` cosine-annealed
    from ``prune_rate`` to ``final_prune_rate`` over training; share the regrowth among
    leaves by the mean ``|momentum|`` of their active weights and grow, in each leaf, the
    inactive weights with the largest ``|momentum|``, at zero. The total number of active
    weights is constant; per-leaf densities move.

    Momentum is a moving average of the *dense* gradients kept in
    ``state.extra['grad_momentum']`` (factor ``momentum``), not the optimizer's own
    trace: the optimizer only sees masked gradients (so inactive weights accumulate no
    slots) and need not have momentum at all (Adam works the same).

    With ``pattern='N:M'`` each group regrows, by momentum, what it lost, so the
    redistribution among leaves does not apply (every leaf keeps density ``N / M``).

    >>> import jax, jax.numpy as jnp, optax
    >>> m = snfs(optax.sgd(0.1), sparsity=0.75, update_every=1, total_steps=10)
    >>> p = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
    >>> state = m.init(p, jax.random.PRNGKey(0))
    >>> state = m.update(state, {"a": jnp.zeros((4, 4)), "b": jnp.ones((4, 4))})
    >>> int(state.masks["a"].sum()) + int(state.masks["b"].sum())  # total is constant
    8
    """
    check_density(prune_rate, "prune_rate")
    check_density(final_prune_rate, "final_prune_rate")
    if final_prune_rate > prune_rate:
        raise ValueError(f"final_prune_rate ({final_prune_rate}) must not exceed prune_rate "
                         f"({prune_rate})")
    if total_steps is None:
        raise ValueError("snfs needs total_steps: the prune rate is annealed over training")
    interval = _epoch_interval("snfs", update_every, batches_per_epoch)
    if end_step is None:
        end_step = total_steps
    else:
        _check_end_step("snfs", end_step, total_steps)
    anneal = cosine_drop_fraction(prune_rate - final_prune_rate, total_steps)

    def rate(step: jax.Array | int) -> jax.Array:
        return jnp.float32(final_prune_rate) + anneal(step)

    rules = RegrowRules(magnitude_drop, momentum_grow, ceil_fraction, momentum_redistribution)
    return prune_and_regrow(optimizer, rules, sparsity=sparsity, distribution=distribution,
                            update_every=interval, drop_fraction=rate, end_step=end_step,
                            momentum=momentum, prunable=prunable, overrides=overrides,
                            name="snfs", pattern=pattern)


register_method("set", sparse_evolutionary)
register_method("rigl", rigl)
register_method("snfs", snfs)
