"""Score, then keep the top fraction: magnitude, random, SNIP, GraSP, SynFlow, and
gradual magnitude pruning.

Every method here is a score function (pure, returning a pytree of scores shaped like the
params) followed by the one selection step :func:`sparsejax.select_masks`, then training
of the survivors under the fixed mask (:func:`sparsejax.fixed_mask`). Methods whose mask
changes during training (gradual magnitude pruning, magnitude pruning after ``prune_step``
steps) recompute it inside ``update`` under ``jit`` at the steps of a schedule.

The score functions live in :mod:`sparsejax.methods.pruning_scores`, SynFlow's rounds in
:mod:`sparsejax.methods.synflow` (both re-exported here).
Scores of weights that are already pruned are set to ``-1`` before a new selection
(every score here is non-negative), so a weight once pruned is never chosen again.

Every method here takes a sparsity ``pattern`` (:mod:`sparsejax.core.patterns`); where the
density follows a schedule (SynFlow's rounds, gradual and scheduled magnitude pruning)
every intermediate mask obeys it too (:mod:`sparsejax.methods.pruning_tables`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.core.distributions import select_masks
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern, method_pattern
from sparsejax.core.schedules import cubic_sparsity
from sparsejax.core.transforms import zero_masked
from sparsejax.core.validation import check_int, check_sparsity
from sparsejax.methods.base import (
    InitContext,
    Method,
    SparseState,
    apply_optimizer,
    named_error,
)
from sparsejax.methods.fixed import (
    fixed_mask,
    masked_optimizer,
    masked_weights_method,
    random_scores,
)
from sparsejax.methods.phases import branch, scheduled_update
from sparsejax.methods.pruning_scores import (
    ApplyFn,
    exclude_pruned,
    grasp_scores,
    magnitude_scores,
    snip_scores,
    synflow_scores,
)
from sparsejax.methods.pruning_tables import masks_for_densities
from sparsejax.methods.registry import register_method
from sparsejax.methods.synflow import synflow, synflow_masks  # noqa: F401  (re-exported)

__all__ = [
    "ApplyFn",
    "magnitude_scores",
    "snip_scores",
    "grasp_scores",
    "synflow_scores",
    "synflow_masks",
    "exclude_pruned",
    "with_biases",
    "masks_for_densities",
    "magnitude",
    "gradual_magnitude",
    "random_prune",
    "snip",
    "grasp",
    "synflow",
    "scheduled_magnitude",
]

PyTree = Any


# --------------------------------------------------------------------------- methods


def _one_shot(optimizer: optax.GradientTransformation, name: str, sparsity: float,
              distribution: str, score: Callable[[PyTree, jax.Array, PyTree, Any], PyTree], *,
              prunable: Prunable, overrides: Mapping[str, float] | None,
              invert: bool = False, fresh_init: bool = False,
              pattern: str | Pattern = "unstructured") -> Method:
    """Score once at init, keep the top ``1 - sparsity`` by ``distribution`` (and, with a
    ``pattern``, within its groups: :func:`sparsejax.select_masks`), train the survivors."""
    check_sparsity(sparsity)
    pattern = method_pattern(pattern, sparsity, name)

    def make_masks(params: PyTree, rng: jax.Array, model_state: PyTree,
                   context: InitContext | None) -> PyTree:
        scores = score(params, rng, model_state, context)
        if invert:
            scores = jax.tree_util.tree_map(jnp.negative, scores)
        return select_masks(scores, 1.0 - sparsity, distribution, prunable=prunable,
                            overrides=overrides, pattern=pattern)

    return fixed_mask(optimizer, make_masks, name, fresh_init=fresh_init)


def with_biases(prunable: Prunable = default_prunable) -> Prunable:
    """``prunable`` that also takes every leaf named ``bias``: the biases then compete in
    the selection with the kernels, as in the SNIP reference code.

    >>> import jax.numpy as jnp
    >>> with_biases()("fc1/bias", jnp.zeros(3)), with_biases()("BatchNorm_0/scale", jnp.ones(3))
    (True, False)
    """

    def chosen(path: str, leaf: Any) -> bool:
        return path.rsplit("/", 1)[-1] == "bias" or bool(prunable(path, leaf))

    return chosen


def _needs_context(context: InitContext | None, name: str) -> InitContext:
    if context is None or not context.batches:
        raise ValueError(f"{name} scores weights on training data: call init with "
                         "context=InitContext(loss_fn, batches) holding at least one batch")
    return context


def scheduled_magnitude(
    optimizer: optax.GradientTransformation, steps: Sequence[int],
    sparsities: Sequence[float], distribution: str = "uniform", *,
    pattern: str | Pattern = "unstructured", prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None, name: str = "scheduled_magnitude",
) -> Method:
    """Magnitude pruning during training: after the update that reaches ``steps[j]`` the
    masks keep the largest ``|w|`` at ``sparsities[j]`` (pruned weights never return), and
    the newly pruned weights are set to exactly zero. Runs inside ``update`` under ``jit``.

    With a structured ``pattern`` every pruning step's mask obeys it
    (:func:`~sparsejax.methods.pruning_tables.masks_for_densities`): ``block:B``
    and ``channel`` prune whole blocks or output channels (by the sum of their ``|w|``)
    down to each step's layer density; ``N:M`` fixes the last sparsity at ``1 - N / M``
    and steps the count per group down with the schedule: step ``j`` keeps
    ``num_kept(1 - sparsities[j], M)`` of every group of ``M`` (e.g. 4:4, 3:4, 2:4).
    The masks are checked against the params at ``init``.

    >>> import jax, jax.numpy as jnp, optax
    >>> m = scheduled_magnitude(optax.sgd(0.0), [1], [0.5])
    >>> s = m.init({"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}, jax.random.PRNGKey(0))
    >>> s = m.update(s, {"w": jnp.zeros((2, 2))})
    >>> s.params["w"]
    Array([[ 0., -3.],
           [ 2.,  0.]], dtype=float32)
    """
    if len(steps) != len(sparsities) or not steps:
        raise ValueError("give one sparsity per pruning step (at least one)")
    if sorted(set(steps)) != list(steps) or steps[0] < 1:
        raise ValueError(f"pruning steps must be increasing and >= 1, got {list(steps)}")
    for s in sparsities:
        check_sparsity(s)
    pattern = method_pattern(pattern, sparsities[-1], name)
    chained = masked_optimizer(optimizer)
    steps_arr = jnp.asarray(np.asarray(steps, np.int32))
    pruning_steps = frozenset(steps)
    select_holder: dict[str, Any] = {}

    def init(params: PyTree, rng: jax.Array, model_state: Any = None,
             context: InitContext | None = None) -> SparseState:
        del context
        if not pattern.ranks_globally:
            selector(params)  # the pattern's checks, before any training
        return SparseState.create(params=params, rng=rng, opt_state=chained.init(params),
                                  model_state=model_state)

    def selector(params: PyTree) -> Callable[[PyTree, jax.Array], PyTree]:
        shapes = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                                        params)
        key = str(shapes)  # the per-leaf split depends on the shapes only
        if key not in select_holder:
            densities = [1.0 - s for s in sparsities]
            try:
                select_holder[key] = masks_for_densities(
                    shapes, densities, distribution, pattern=pattern, prunable=prunable,
                    overrides=overrides)
            except ValueError as error:
                raise named_error(name, error) from None
        return select_holder[key]

    def update_with(state: SparseState, grads: PyTree, due: jax.Array | bool,
                    **extra_args: Any) -> SparseState:
        params, opt_state = apply_optimizer(chained, grads, state.opt_state, state.params,
                                            masks=state.masks, **extra_args)
        step = state.step + 1

        def prune() -> PyTree:
            scores = exclude_pruned(magnitude_scores(params), state.masks)
            return selector(params)(scores, jnp.argmax(steps_arr == step))

        # Only the mask decision sits in the branch (a lax.cond when ``due`` is traced);
        # zeroing the newly pruned weights is elementwise and changes nothing between
        # pruning steps, where the pruned weights are zero already.
        masks = branch(due, prune, lambda: state.masks)
        if due is not False:
            params = zero_masked(params, masks)
        return state.replace(step=step, params=params, masks=masks, opt_state=opt_state)

    def due(steps_done: jax.Array | int) -> jax.Array | bool:
        if isinstance(steps_done, int):  # the host's copy of the counter
            return steps_done in pruning_steps
        return jnp.any(steps_arr == steps_done)

    return masked_weights_method(name, init, *scheduled_update(update_with, due))


def magnitude(
    optimizer: optax.GradientTransformation, *, sparsity: float, distribution: str = "global",
    prune_step: int = 0, pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable, overrides: Mapping[str, float] | None = None,
) -> Method:
    """One-shot magnitude pruning: keep the largest ``|w|`` at init (``prune_step=0``) or
    after ``prune_step`` steps of dense training, then train the survivors, within
    ``pattern`` (e.g. ``"2:4"``, :mod:`sparsejax.core.patterns`; after ``prune_step`` steps an
    N:M pattern goes from dense to ``N:M`` in that one step).

    >>> import jax, jax.numpy as jnp, optax
    >>> m = magnitude(optax.sgd(0.1), sparsity=0.5)
    >>> m.init({"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}, jax.random.PRNGKey(0)).masks["w"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """
    check_sparsity(sparsity)
    if prune_step < 0:
        raise ValueError(f"prune_step must be >= 0, got {prune_step}")
    if prune_step:
        return scheduled_magnitude(optimizer, [prune_step], [sparsity], distribution,
                                   pattern=pattern, prunable=prunable, overrides=overrides,
                                   name="magnitude")
    return _one_shot(optimizer, "magnitude", sparsity, distribution,
                     lambda params, rng, state, context: magnitude_scores(params),
                     prunable=prunable, overrides=overrides, pattern=pattern)


def gradual_magnitude(
    optimizer: optax.GradientTransformation, *, sparsity: float, total_steps: int,
    distribution: str = "uniform", initial_sparsity: float = 0.0, begin_step: int = 0,
    end_step: int | None = None, frequency: int = 100, pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable, overrides: Mapping[str, float] | None = None,
) -> Method:
    """Gradual magnitude pruning on the cubic schedule of Zhu & Gupta 2017
    (:func:`sparsejax.cubic_sparsity`): every ``frequency`` steps from ``begin_step`` to
    ``end_step`` (default 75% of ``total_steps``) the smallest ``|w|`` are pruned up to the
    scheduled sparsity, reaching ``sparsity`` at ``end_step``.

    With a ``pattern`` every pruning step keeps it (:func:`scheduled_magnitude`): blocks
    and channels ramp by whole blocks or channels; ``N:M`` (``sparsity`` must be
    ``1 - N / M``) keeps ``num_kept(1 - scheduled sparsity, M)`` of every group, so the
    groups step from ``M:M`` down to ``N:M`` where the cubic ramp passes those densities.

    >>> import jax, jax.numpy as jnp, optax
    >>> m = gradual_magnitude(optax.sgd(0.0), sparsity=0.75, total_steps=4, end_step=2,
    ...                       frequency=1)
    >>> s = m.init({"w": jnp.arange(1.0, 9.0).reshape(2, 4)}, jax.random.PRNGKey(0))
    >>> for _ in range(2):
    ...     s = m.update(s, {"w": jnp.zeros((2, 4))})
    ...     print(int(s.masks["w"].sum()))
    3
    2
    """
    check_sparsity(sparsity)
    check_int(frequency, "frequency (steps)", minimum=1)
    end = int(round(0.75 * total_steps)) if end_step is None else end_step
    if not 0 <= begin_step < end <= total_steps:
        raise ValueError(f"need 0 <= begin_step < end_step <= total_steps, got "
                         f"{begin_step}, {end}, {total_steps}")
    schedule = cubic_sparsity(sparsity, begin_step, end, initial_sparsity=initial_sparsity,
                              frequency=frequency)
    steps = [t for t in range(begin_step + frequency, end + 1, frequency)]
    if not steps or steps[-1] != end:
        steps.append(end)
    steps = [t for t in steps if t >= 1]
    # Python floats from shapes and steps alone, also when the method is built inside a
    # trace (optax.inject_hyperparams builds it in every update).
    with jax.ensure_compile_time_eval():
        sparsities = [float(schedule(t)) for t in steps]
    sparsities[-1] = sparsity
    return scheduled_magnitude(optimizer, steps, sparsities, distribution, pattern=pattern,
                               prunable=prunable, overrides=overrides,
                               name="gradual_magnitude")


def random_prune(
    optimizer: optax.GradientTransformation, *, sparsity: float, distribution: str = "global",
    pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable, overrides: Mapping[str, float] | None = None,
) -> Method:
    """Random pruning at init (uniform random scores), then training the survivors.

    >>> import jax, jax.numpy as jnp, optax
    >>> m = random_prune(optax.sgd(0.1), sparsity=0.75)
    >>> int(m.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0)).masks["w"].sum())
    4
    """
    return _one_shot(optimizer, "random_prune", sparsity, distribution,
                     lambda params, rng, state, context: random_scores(params, rng),
                     prunable=prunable, overrides=overrides, pattern=pattern)


def snip(
    optimizer: optax.GradientTransformation, *, sparsity: float, distribution: str = "global",
    prune_biases: bool = False, fresh_init: bool = False, pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable, overrides: Mapping[str, float] | None = None,
) -> Method:
    """SNIP (Lee et al. 2019): keep the largest connection sensitivities ``|g * w|`` at
    init (scored on the batches of the :class:`~sparsejax.InitContext`), then train the
    survivors.

    Two options give the protocol of the SNIP reference code (namhoonlee/snip-public):

    * ``prune_biases``: the biases enter the global selection with the kernels, scored
      ``|g * w|`` like them, which is 0 at the zero bias init, so every bias is pruned.
      The kept count is taken over kernels and biases, ``num_kept(1 - sparsity, K + B)``,
      and all of it goes to kernels: the kernels keep slightly more than ``1 - sparsity``
      of theirs. Needs ``distribution="global"`` (a per-layer quota would keep biases).
    * ``fresh_init``: the mask is scored on the init given to ``init`` and a second,
      independent init (``context.init_params``, which ``sparsejax train`` passes) is
      trained under it.

    >>> import jax, jax.numpy as jnp, optax
    >>> from sparsejax.methods.base import InitContext
    >>> loss = lambda p, s, b: (jnp.sum(p["w"] * b), (s, {}))
    >>> m = snip(optax.sgd(0.1), sparsity=0.5)
    >>> ctx = InitContext(loss, (jnp.array([[3.0, 1.0], [1.0, 1.0]]),))
    >>> m.init({"w": jnp.array([[1.0, 2.0], [1.0, 1.0]])}, jax.random.PRNGKey(0),
    ...        context=ctx).masks["w"]
    Array([[ True,  True],
           [False, False]], dtype=bool)
    """

    if not isinstance(prune_biases, bool):  # fresh_init: fixed_mask checks it
        raise TypeError(f"snip option prune_biases must be true or false, got "
                        f"{prune_biases!r}")
    if prune_biases:
        if distribution != "global":
            raise ValueError(f"snip prune_biases=True puts the biases in the reference code's "
                             f"global selection; it needs distribution 'global', got "
                             f"{distribution!r}")
        prunable = with_biases(prunable)

    def score(params: PyTree, rng: jax.Array, model_state: PyTree,
              context: InitContext | None) -> PyTree:
        ctx = _needs_context(context, "snip")
        return snip_scores(ctx.loss_fn, params, model_state, ctx.batches, prunable=prunable)

    return _one_shot(optimizer, "snip", sparsity, distribution, score, prunable=prunable,
                     overrides=overrides, fresh_init=fresh_init, pattern=pattern)


def grasp(
    optimizer: optax.GradientTransformation, *, sparsity: float, distribution: str = "global",
    temperature: float = 200.0, samples_per_class: int = 10, apply_fn: ApplyFn | None = None,
    pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable, overrides: Mapping[str, float] | None = None,
) -> Method:
    """GraSP (Wang et al. 2020): remove the weights with the largest ``-w * H g`` (keep the
    smallest) at init, then train the survivors. With ``apply_fn`` (the harness gives it)
    logits are divided by ``temperature`` and ``samples_per_class`` examples of each class
    are used.

    >>> import jax, jax.numpy as jnp, optax
    >>> from sparsejax.methods.base import InitContext
    >>> loss = lambda p, s, b: (0.5 * jnp.sum(p["w"] ** 2 * b), (s, {}))
    >>> m = grasp(optax.sgd(0.1), sparsity=0.5)
    >>> ctx = InitContext(loss, (jnp.ones((2, 2)),))
    >>> m.init({"w": jnp.array([[1.0, 3.0], [2.0, 0.5]])}, jax.random.PRNGKey(0),
    ...        context=ctx).masks["w"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """

    def score(params: PyTree, rng: jax.Array, model_state: PyTree,
              context: InitContext | None) -> PyTree:
        ctx = _needs_context(context, "grasp")
        return grasp_scores(ctx.loss_fn, params, model_state, ctx.batches, apply_fn=apply_fn,
                            temperature=temperature, samples_per_class=samples_per_class)

    return _one_shot(optimizer, "grasp", sparsity, distribution, score, prunable=prunable,
                     overrides=overrides, invert=True, pattern=pattern)


register_method("magnitude", magnitude)
register_method("gradual_magnitude", gradual_magnitude)
register_method("random_prune", random_prune)
register_method("snip", snip)
register_method("grasp", grasp)
