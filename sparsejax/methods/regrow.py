"""The prune-and-regrow engine of dynamic sparse training (SET, RigL and SNFS are its
rules, :mod:`sparsejax.methods.dst`).

The network is sparse from the first step to the last and the number of active weights
is fixed. Every ``update_every`` steps (until ``end_step``) the engine

1. drops, in each prunable leaf, the ``n_drop`` active weights with the smallest *drop
   score* (a :data:`~sparsejax.methods.dst_rules.DropCountFn` turns the scheduled
   fraction into per-leaf counts);
2. shares the dropped total among the leaves (a
   :data:`~sparsejax.methods.dst_rules.RedistributeFn`), never more than a leaf can hold;
3. grows that many weights with the largest *grow score* among the weights that are not
   active after the drop (so nothing regrows onto an active weight);
4. sets grown weights to zero and zeroes their optimizer slots (through
   ``optax.tree_utils.tree_map_params``, so any optax optimizer works); a weight that is
   dropped and regrown in the same update keeps its value and slots.

Single weights (unstructured) are chosen by one search for every leaf of a size
(:func:`regrow_masks`); the patterns of units (N:M groups, blocks, channels) leaf by leaf
(:func:`regrow_masks_units`), as the module :mod:`sparsejax.methods.dst` describes.
"""


from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax.core._tree import leaf_paths
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import (
    Pattern,
    Unstructured,
    as_pattern,
    pattern_counts,
    pattern_topk,
)
from sparsejax.core.schedules import Schedule, is_update_step
from sparsejax.core.topk import topk_rows
from sparsejax.core.topk_search import count
from sparsejax.core.transforms import zero_masked
from sparsejax.core.validation import check_int, check_sparsity
from sparsejax.methods.base import (
    InitContext,
    Method,
    SparseState,
    apply_optimizer,
    count_skipped_step,
    step_key,
)
from sparsejax.methods.dst_rules import (
    DropCountFn,  # noqa: F401  (re-exported: dst_rules.__all__)
    RedistributeFn,  # noqa: F401  (re-exported: dst_rules.__all__)
    RegrowRules,
    ScoreFn,  # noqa: F401  (re-exported: dst_rules.__all__)
    Signals,
    allocate,  # noqa: F401  (re-exported: dst_rules.__all__)
    grouped,
)
from sparsejax.methods.fixed import masked_optimizer, masked_weights_method, static
from sparsejax.methods.phases import branch, scheduled_update, select

__all__ = [
    "MOMENTUM_KEY",
    "prune_and_regrow",
    "regrow_masks",
    "regrow_masks_units",
    "reset_slots",
]

PyTree = Any

MOMENTUM_KEY = "grad_momentum"
"""The key of the moving average of dense gradients in ``state.extra`` (SNFS)."""


def regrow_masks(rules: RegrowRules, signals: Signals, fraction: jax.Array,
                 pattern: Pattern | None = None,
                 ) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """One prune-and-regrow decision on the prunable leaves.

    Returns ``(new_masks, n_drop, n_grow)``. Nothing grows onto a weight that stays
    active, so ``sum(new) == sum(old) - n_drop + n_grow`` per leaf.

    With an N:M ``pattern`` (masks that hold exactly ``N`` per group) the new masks do
    too: see :func:`regrow_masks_units`; with ``block:B`` or ``channel`` whole units move
    (the same function). ``None`` or ``'unstructured'``: the rules as they are.

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.methods.dst_rules import (gradient_grow, magnitude_drop,
    ...                                         round_fraction, same_leaf)
    >>> s = Signals(params=[jnp.array([0.5, 0.1, 0.0, 0.0, 0.3])],
    ...             masks=[jnp.array([True, True, False, False, True])],
    ...             grads=[jnp.array([0.0, 0.0, 0.9, 0.2, 0.0])], momentum=None,
    ...             key=jax.random.PRNGKey(0))
    >>> rules = RegrowRules(magnitude_drop, gradient_grow, round_fraction, same_leaf)
    >>> masks, n_drop, n_grow = regrow_masks(rules, s, jnp.float32(0.34))
    >>> masks[0], int(n_drop[0]), int(n_grow[0])
    (Array([ True, False,  True, False,  True], dtype=bool), 1, 1)
    """
    if pattern is not None:
        pattern = as_pattern(pattern)
        if not pattern.ranks_globally:
            if signals.rows is not None:
                raise ValueError(f"regrow_masks under pattern {pattern} takes per-leaf "
                                 "signals (rows=None): its units are per leaf")
            return regrow_masks_units(rules, signals, fraction, pattern)
    # Leaves of one size are the rows of one array from here on (the engine hands them
    # so): scores, both searches and the new masks are one program per size, and the
    # masks are split into leaves once, at the end.
    leaf_shapes = [m.shape for m in signals.masks] if signals.rows is None else None
    signals = grouped(signals)
    masks = signals.masks
    sizes = signals.per_leaf([jnp.full(m.shape[0], m.shape[1], jnp.int32) for m in masks])
    n_active = signals.per_leaf([count(m) for m in masks])
    n_drop = jnp.minimum(rules.drop_counts(fraction, n_active), n_active)
    kept = topk_rows([jnp.where(m, s, -jnp.inf) for m, s in zip(
        masks, rules.drop_scores(signals), strict=True)], signals.per_entry(n_active - n_drop))
    capacity = sizes - (n_active - n_drop)
    n_grow = jnp.minimum(rules.redistribute(signals, n_drop, capacity), capacity)
    grown = topk_rows([jnp.where(k, -jnp.inf, g) for k, g in zip(
        kept, rules.grow_scores(signals), strict=True)], signals.per_entry(n_grow))
    new_masks = [k | g for k, g in zip(kept, grown, strict=True)]
    if leaf_shapes is not None:  # per-leaf signals in, per-leaf masks out
        new_masks = signals.ungroup(new_masks, leaf_shapes)
    return new_masks, n_drop, n_grow


def regrow_masks_units(rules: RegrowRules, signals: Signals, fraction: jax.Array,
                       pattern: Pattern) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """:func:`regrow_masks` under a structured ``pattern`` (N:M, ``block:B`` or
    ``channel``): masks that obey the pattern obey it after the update, each leaf with
    the same number of units (:func:`sparsejax.core.patterns.pattern_units`).

    Per leaf, ``n_drop = drop_counts(fraction, active)`` and the active ones with the
    lowest drop scores go: weights under N:M (one exact top-k per leaf), otherwise the
    blocks or channels with the lowest sum of drop scores
    (:func:`sparsejax.core.patterns.pattern_topk`). Then what was dropped grows back in
    the pattern's units: under N:M each group grows as many as it lost, the highest grow
    scores among its inactive weights (ties to the first along the axis); otherwise as
    many units as were dropped, the highest sums of grow scores among the inactive
    units. Either may regrow what this update dropped, as in the unstructured engine.
    ``n_grow == n_drop``; ``rules.redistribute`` is not used. A leaf that cannot carry
    the pattern (one an override keeps dense) is left as it is.

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.methods.dst_rules import (gradient_grow, magnitude_drop,
    ...                                         round_fraction, same_leaf)
    >>> rules = RegrowRules(magnitude_drop, gradient_grow, round_fraction, same_leaf)
    >>> s = Signals(params=[jnp.array([[0.5], [0.1], [0.0], [0.0]])],
    ...             masks=[jnp.array([[True], [True], [False], [False]])],
    ...             grads=[jnp.array([[0.0], [0.0], [0.2], [0.9]])], momentum=None,
    ...             key=jax.random.PRNGKey(0))
    >>> masks, n_drop, n_grow = regrow_masks(rules, s, jnp.float32(0.5), as_pattern("2:4"))
    >>> masks[0].ravel(), int(n_drop[0]), int(n_grow[0])
    (Array([ True, False, False,  True], dtype=bool), 1, 1)
    >>> s = Signals(params=[jnp.array([[0.5, 0.1, 0.0], [0.4, 0.2, 0.0]])],
    ...             masks=[jnp.array([[True, True, False], [True, True, False]])],
    ...             grads=[jnp.array([[0.0, 0.0, 0.3], [0.0, 0.0, 0.4]])], momentum=None,
    ...             key=jax.random.PRNGKey(0))
    >>> masks, n_drop, n_grow = regrow_masks(rules, s, jnp.float32(0.5), as_pattern("channel"))
    >>> masks[0][0], int(n_drop[0]), int(n_grow[0])  # channel 1 (|w| 0.3) moves to 2
    (Array([ True, False,  True], dtype=bool), 1, 1)
    """
    # A pattern that fixes the density (N:M) drops weights leaf-wide, then regrows per group
    drop_pattern = Unstructured() if pattern.fixed_density is not None else pattern
    fits = [_fits(pattern, m.shape) for m in signals.masks]
    n_active = jnp.stack([pattern_counts(m, drop_pattern) if ok else jnp.int32(0)
                          for m, ok in zip(signals.masks, fits, strict=True)])
    n_drop = jnp.minimum(rules.drop_counts(fraction, n_active), n_active)
    new_masks = []
    for i, (m, d, g) in enumerate(zip(signals.masks, rules.drop_scores(signals),
                                      rules.grow_scores(signals), strict=True)):
        if not fits[i]:
            new_masks.append(m)
            continue
        kept = pattern_topk(jnp.where(m, d, -jnp.inf), drop_pattern, n_active[i] - n_drop[i])
        lost = pattern_counts(m & ~kept, pattern)
        new_masks.append(kept | pattern_topk(jnp.where(kept, -jnp.inf, g), pattern, lost))
    return new_masks, n_drop, n_drop


def _fits(pattern: Pattern, shape: tuple[int, ...]) -> bool:
    try:
        pattern.check_shape(shape)
    except ValueError:
        return False
    return True


def reset_slots(optimizer: optax.GradientTransformation, opt_state: optax.OptState,
                keep: PyTree) -> optax.OptState:
    """Zero every per-parameter optimizer slot where ``keep`` is False.

    Works through ``optax.tree_utils.tree_map_params``, so any optax optimizer (chains,
    ``inject_hyperparams`` wrappers, ``multi_transform`` and ``masked``, whose slots hold
    ``optax.MaskedNode`` where another optimizer owns the leaf) is handled; counts and
    hyperparameters are kept.

    >>> import jax.numpy as jnp, optax
    >>> opt = optax.sgd(0.1, momentum=0.9)
    >>> state = opt.init({"w": jnp.ones(2)})
    >>> state = opt.update({"w": jnp.ones(2)}, state)[1]
    >>> reset_slots(opt, state, {"w": jnp.array([True, False])})[0].trace["w"]
    Array([1., 0.], dtype=float32)
    """
    def reset(slot: Any, k: jax.Array) -> Any:
        if isinstance(slot, optax.MaskedNode):  # a leaf another optimizer owns
            return slot
        return jnp.where(k, slot, jnp.zeros((), jnp.result_type(slot)))

    return optax.tree_utils.tree_map_params(
        optimizer, reset, opt_state, keep, transform_non_params=lambda x: x,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


def prune_and_regrow(
    optimizer: optax.GradientTransformation,
    rules: RegrowRules,
    *,
    sparsity: float,
    distribution: str = "erk",
    update_every: int,
    drop_fraction: Schedule,
    end_step: int | None = None,
    skip_optimizer_on_update: bool = False,
    momentum: float | None = None,
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
    name: str = "prune_and_regrow",
    pattern: str | Pattern = "unstructured",
) -> Method:
    """The dynamic-sparse-training engine: a fixed budget of active weights, moved every
    ``update_every`` steps by ``rules``.

    Args:
      optimizer: any optax optimizer.
      rules: drop score, grow score, drop count and redistribution (:class:`RegrowRules`).
      sparsity: fraction of prunable weights that are inactive, at every step.
      distribution: how the initial budget is shared among leaves (``'erk'``, ...).
      update_every: steps between mask updates (updates after steps ``j * update_every``).
      drop_fraction: schedule of the fraction handed to ``rules.drop_counts``, evaluated
        at the number of steps done (including the current one).
      end_step: no mask updates from this step on (``None``: never stop).
      skip_optimizer_on_update: on update steps, only move the mask (RigL's code; the
        optimizer's step counters still advance, so its schedules follow the training
        step); otherwise the optimizer steps first and the mask moves after.
      momentum: if set, keep ``m = beta * m + (1 - beta) * g`` of the dense gradients in
        ``state.extra['grad_momentum']`` for the rules (SNFS).
      prunable, overrides: which leaves are sparse, as in :func:`sparsejax.static`.
      name: the method's name.
      pattern: ``'unstructured'`` (default), ``'N:M'``: every group of ``M`` keeps
        exactly ``N`` from init to the end (``sparsity`` must then be ``1 - N / M``), or
        ``'block:B'`` / ``'channel'``: whole blocks or output channels move, each leaf
        keeping its count of them (see the module docstring). A prunable leaf that
        cannot carry the pattern is an error at ``init``, naming it.

    >>> import jax, jax.numpy as jnp, optax
    >>> from sparsejax.methods.dst_rules import (magnitude_drop, random_grow,
    ...                                         round_fraction, same_leaf)
    >>> from sparsejax.core.schedules import constant
    >>> rules = RegrowRules(magnitude_drop, random_grow, round_fraction, same_leaf)
    >>> m = prune_and_regrow(optax.sgd(0.1), rules, sparsity=0.5, update_every=1,
    ...                      drop_fraction=constant(0.5), distribution="uniform")
    >>> state = m.init({"w": jnp.arange(1.0, 9.0).reshape(2, 4)}, jax.random.PRNGKey(0))
    >>> state = m.update(state, {"w": jnp.ones((2, 4))})
    >>> int(state.masks["w"].sum()), int(state.step)
    (4, 1)
    """
    check_sparsity(sparsity)
    check_int(update_every, "update_every (steps)", minimum=1)
    if end_step is not None and end_step < 1:
        raise ValueError(f"end_step must be >= 1, got {end_step}")
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum (moving-average factor) must lie in [0, 1), got {momentum}")
    pattern = as_pattern(pattern)
    chained = masked_optimizer(optimizer)
    # the random start mask: static's, its pattern checked and named as this method
    start = static(optimizer, sparsity, distribution, prunable=prunable, overrides=overrides,
                   pattern=pattern, name=name)

    def init(params: Any, rng: jax.Array, model_state: Any = None,
             context: InitContext | None = None) -> SparseState:
        del context
        state = start.init(params, rng, model_state)
        extra = {}
        if momentum is not None:
            extra[MOMENTUM_KEY] = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        return state.replace(opt_state=chained.init(state.params), extra=extra)

    def decide(state: SparseState, params: Any, grads: Any, extra: Any) -> Any:
        """The new masks: one prune-and-regrow decision at ``params``."""
        paths = leaf_paths(params)
        flat_params, treedef = jax.tree_util.tree_flatten(params)
        flat_masks = jax.tree_util.tree_leaves(state.masks)
        flat_grads = jax.tree_util.tree_leaves(grads)
        chosen = [i for i, (path, p) in enumerate(zip(paths, flat_params, strict=True))
                  if prunable(path, p)]
        flat_momentum = (jax.tree_util.tree_leaves(extra[MOMENTUM_KEY])
                         if momentum is not None else None)
        signals = Signals(
            params=[flat_params[i] for i in chosen],
            masks=[flat_masks[i] for i in chosen],
            grads=[flat_grads[i] for i in chosen],
            momentum=None if flat_momentum is None else [flat_momentum[i] for i in chosen],
            key=step_key(state, 0x44535421),
        )
        new_masks, _, _ = regrow_masks(rules, signals, drop_fraction(state.step + 1), pattern)
        masks = list(flat_masks)
        for i, mask in zip(chosen, new_masks, strict=True):
            masks[i] = mask
        return jax.tree_util.tree_unflatten(treedef, masks)

    def update_with(state: SparseState, grads: Any, due: jax.Array | bool,
                    **extra_args: Any) -> SparseState:
        # Only the mask decision sits in the branch (a lax.cond for a traced ``due``): its
        # top-k needs it, while the optimizer step, the zeroing of grown weights and the
        # slot reset are elementwise and run every step as selections on ``due``, which
        # XLA fuses. A cond over the whole state made every traced step (the optax form,
        # research code) copy params and slots through the branch.
        extra = state.extra
        if momentum is not None:
            extra = {**extra, MOMENTUM_KEY: jax.tree_util.tree_map(
                lambda m, g: momentum * m + (1.0 - momentum) * g, extra[MOMENTUM_KEY], grads)}

        def optimizer_step() -> tuple[Any, Any]:
            return apply_optimizer(chained, grads, state.opt_state, state.params,
                                   masks=state.masks, **extra_args)

        if skip_optimizer_on_update:
            # Update steps only move the mask (RigL's code), decided on the weights before
            # the step: the decision comes first, so the optimizer step, the zeroing and
            # the slot reset after it fuse into one elementwise pass. The optimizer's step
            # counters still count the step, as RigL's global step does, so a schedule
            # inside it follows the training step.
            masks = branch(due, lambda: decide(state, state.params, grads, extra),
                           lambda: state.masks)
            params, opt_state = select(
                due, lambda: (state.params, count_skipped_step(state.opt_state)),
                optimizer_step)
        else:  # the optimizer steps first and the mask moves after
            params, opt_state = optimizer_step()
            masks = branch(due, lambda: decide(state, params, grads, extra),
                           lambda: state.masks)
        if due is not False:
            # Survivors (including weights dropped and regrown at once) keep value and
            # slots; grown weights start at zero with zeroed slots. Between updates
            # ``keep`` is all True and changes nothing.
            keep = jax.tree_util.tree_map(
                lambda old, new: jnp.logical_or(jnp.logical_and(old, new),
                                                jnp.logical_not(due)), state.masks, masks)
            params = zero_masked(params, keep)
            opt_state = reset_slots(chained, opt_state, keep)
        return state.replace(step=state.step + 1, params=params, masks=masks,
                             opt_state=opt_state, extra=extra)

    def due(steps_done: jax.Array | int) -> jax.Array | bool:
        return is_update_step(steps_done, update_every, end_step=end_step)

    return masked_weights_method(name, init, *scheduled_update(update_with, due))
