"""Continuously relaxed Bernoulli gates over frozen weights (Gaussian stochastic gates and
hard-concrete L0 gates): strong lottery tickets without a straight-through estimator.

Every prunable weight ``w`` gets one gate parameter ``g`` (kept in ``state.scores``); the
weights never change. In training the forward pass uses ``w * z`` with a random gate
``z = gate(g, noise)`` in [0, 1] drawn from :func:`~sparsejax.methods.base.step_key`, and
the loss adds ``lam * mean(P(z > 0))``, the expected fraction of open gates (an expected-L0
penalty, normalised by the number of gates so that ``lam`` means the same on every
model). The gradient reaches ``g`` through the reparameterisation ``z(g, noise)`` by plain
automatic differentiation (no ``custom_vjp``).

The gate forms (``gaussian``, ``hard_concrete``) are in :mod:`sparsejax.methods.gate_forms`;
the options, checked once, in :mod:`sparsejax.methods.gate_settings`. Every piece below
(the forward's gated weights, the penalty, the hard masks, the update after the
optimizer) is a function of those settings, and :func:`gates` assembles them.

Evaluation and export use ``effective_params = w * m`` with a hard binary mask ``m``
(``method.hard_masks(state)``), derived from the gate parameters by the ``binarize`` rule
when it is asked for, never in a training step (the rules:
:mod:`sparsejax.methods.gate_readout`, with the densities the penalty and the controller
read).

A target ``sparsity`` is reached by a Lagrange-multiplier controller: the target density
follows a cubic schedule from 1 to ``1 - sparsity`` over the first ``ramp`` of training,
and after every step ``lam <- max(0, lam + lam_rate * (open density - target density))``
(dual ascent on the constraint "density <= target"), kept in ``state.extra['lam']``. The
controller measures the fraction of gates that are open at test time (test gate > 0), the
mask that is kept at the end, rather than the expected density ``mean P(z > 0)``: closed
gates keep a residual ``P(z > 0)``, so the expected density differs from the hard mask's
density, and on LeNet-300-100 a controller on it left clearly too many or too few gates
open (see docs/results.md).

That controller can only close gates. When the loss alone closes more of them than the
target asks, ``lift_rate`` (default 2 with a target) opens them again: after every step
with a deficit (open density below the target density) and ``lam`` at 0, every gate
parameter is raised by ``lift_rate * deficit`` (``lift_scope='all'``), a uniform shift of
the opening threshold outside the optimizer, so that the closed gates closest to opening
(those the ``'exact'`` rule would add at the end) open during training and the loss
adapts to them. Waiting for ``lam`` to reach 0 keeps the two from fighting. (A penalty
with a negative ``lam``, the two-sided controller tried earlier, pushes every gate near
the threshold at the optimizer's full step and made accuracy collapse, see
docs/results.md.)

``state.scores`` has the structure of ``params``; leaves without gates (biases, norms,
whatever ``prunable`` rejects) hold an empty ``(0,)`` array there. ``state.masks`` holds
what the training forward pass applies besides the gates: nothing, so all ``True``; the
hard mask is ``method.hard_masks(state)``. (Refreshing it after every update cost 0.22 of
a ResNet-18 step on CPU, see docs/benchmarks.md.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.core._tree import path_str, split_rows
from sparsejax.core.distributions import warn_empty_layers
from sparsejax.core.masks import Prunable, default_prunable, dense_masks, prunable_leaves
from sparsejax.core.topk import num_kept
from sparsejax.core.transforms import zero_masked
from sparsejax.methods.base import (
    InitContext,
    Method,
    OutsideLoop,
    SparseState,
    apply_optimizer,
    step_key,
)
from sparsejax.methods.draws import draw_each, draw_flat, draws_per_leaf
from sparsejax.methods.gate_forms import (
    GATE_FORMS,
    GateForm,
    gaussian_gate,
    hard_concrete_gate,
)
from sparsejax.methods.gate_readout import (
    expected_density,
    gate_leaves,
    gate_masks,
    gate_mean,
    open_density,
)
from sparsejax.methods.gate_settings import (
    BINARIZE_RULES,
    GateSettings,
    gate_settings,
    noise_factor,
    rounding_weight,
    target_density,
)
from sparsejax.methods.registry import register_method
from sparsejax.methods.strong_init import init_weights

__all__ = [
    "GateForm",
    "GATE_FORMS",
    "BINARIZE_RULES",
    "gaussian_gate",
    "hard_concrete_gate",
    "gates",
    "gate_leaves",
    "expected_density",
    "open_density",
    "gate_masks",
    "init_gates",
    "gated_weights",
    "gate_penalty",
    "advance_gates",
]

PyTree = Any


def init_gates(settings: GateSettings, optimizer: optax.GradientTransformation,
               params: PyTree, rng: jax.Array, model_state: Any = None,
               context: InitContext | None = None) -> SparseState:
    """The method's ``init``: frozen weights drawn by ``weight_init``, one gate parameter
    per prunable weight (an empty ``(0,)`` leaf elsewhere), ``lam`` and, with
    ``noise='pool'``, the noise pool in ``state.extra``."""
    del context
    form, prunable, density = settings.form, settings.prunable, settings.density
    # Keys taken from their stacks by split_rows: eagerly, iterating a stack of keys
    # compiles a slice per key (0.6 s for 64 leaves).
    weight_key, gate_key = _rows(jax.random.split(jax.random.fold_in(rng, 0x67617465)))
    params = init_weights(params, weight_key, settings.weight_init, density=density,
                          prunable=prunable)
    is_gated, treedef = jax.tree_util.tree_flatten(prunable_leaves(params, prunable))
    leaves = treedef.flatten_up_to(params)
    gated = sum(math.prod(jnp.shape(p)) for p, f in zip(leaves, is_gated, strict=True) if f)
    if settings.binarize in ("topk", "exact") and gated and num_kept(density, gated) == 0:
        warn_empty_layers(density, [path_str(p) for (p, _), f in zip(
            jax.tree_util.tree_flatten_with_path(params)[0], is_gated, strict=True) if f])
    keys = jax.random.split(gate_key, max(len(leaves), 1))
    if hasattr(form.init, "from_bits"):  # a random start: every leaf from one generator
        drawn = iter(draw_each(form.init, keys[np.flatnonzero(np.asarray(is_gated, bool))],
                               [jnp.shape(p) for p, f in zip(leaves, is_gated, strict=True)
                                if f]))
        starts = [next(drawn) if f else None for f in is_gated]
    else:
        starts = [draw_flat(form.init, k, jnp.shape(p)) if f else None
                  for k, p, f in zip(_rows(keys), leaves, is_gated, strict=True)]
    scores = jax.tree_util.tree_unflatten(treedef, [
        start if f else jnp.zeros((0,), jnp.float32)
        for start, f in zip(starts, is_gated, strict=True)])
    extra = {"lam": jnp.float32(settings.lam)}
    if settings.noise == "pool":
        # twice as many draws as gates: each step reads a window of one draw per gate at a
        # random offset (gated_weights)
        size = sum(int(jnp.size(p)) for p, f in zip(leaves, is_gated, strict=True) if f)
        extra["noise_pool"] = form.noise(jax.random.fold_in(rng, 0x706F6F6C), (2 * size,))
    return SparseState.create(
        params=params, rng=rng, opt_state=optimizer.init(scores), scores=scores,
        masks=dense_masks(params), model_state=model_state, extra=extra)


def _rows(stack: jax.Array) -> list[jax.Array]:
    """The rows of ``stack`` (:func:`~sparsejax.core._tree.split_rows`)."""
    n = int(stack.shape[0])
    return split_rows([stack], [list(range(n))], [tuple(stack.shape[1:])] * n)


def _step_noise(settings: GateSettings, state: SparseState, key: jax.Array,
                shapes: list[tuple[int, ...]], is_gated: list[bool]) -> list[jax.Array | None]:
    """This step's noise per leaf (None where a leaf has no gates): fresh draws, one key
    per leaf, or (``noise='pool'``) a window of the pool at a random offset, cut into the
    gated leaves' shapes."""
    if settings.noise == "fresh":
        return draws_per_leaf(key, shapes, settings.form.noise, is_gated)
    pool = state.extra["noise_pool"]
    size = pool.shape[0] // 2
    window = jax.lax.dynamic_slice(pool, (jax.random.randint(key, (), 0, size + 1),), (size,))
    gated = [shape for shape, f in zip(shapes, is_gated, strict=True) if f]
    parts = iter(jnp.split(window, np.cumsum([math.prod(g) for g in gated])[:-1]))
    return [next(parts).reshape(shape) if f else None
            for shape, f in zip(shapes, is_gated, strict=True)]


def gated_weights(settings: GateSettings, state: SparseState, scores: PyTree) -> PyTree:
    """The method's ``materialize``: every prunable weight times its training gate
    ``relax(g, noise)`` with this step's noise (``step_key(state, 0x7A)``), differentiable
    in the gate parameters ``scores``."""
    is_gated, treedef = jax.tree_util.tree_flatten(
        prunable_leaves(state.params, settings.prunable))
    factor = noise_factor(settings, state.step)
    weights = treedef.flatten_up_to(state.params)
    draws = _step_noise(settings, state, step_key(state, 0x7A),
                        [jnp.shape(w) for w in weights], is_gated)

    def sample(s: jax.Array, eps: jax.Array) -> jax.Array:
        return settings.form.relax(s, eps if settings.sigma_final is None else factor * eps)

    out = [sample(s, eps).astype(jnp.result_type(w)) * w if f else w
           for w, s, eps, f in zip(weights, jax.tree_util.tree_leaves(scores), draws,
                                   is_gated, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _rounding_penalty(settings: GateSettings, params: PyTree, scores: PyTree) -> jax.Array:
    def per_gate(s: jax.Array) -> jax.Array:
        c = settings.form.test_gate(s)
        return c * (1.0 - c)

    return gate_mean(settings, params, scores, per_gate)


def gate_penalty(settings: GateSettings, state: SparseState, scores: PyTree) -> jax.Array:
    """``lam * mean P(z > 0)``, plus the rounding penalty when ``rounding > 0``."""
    value = state.extra["lam"] * expected_density(settings, state.params, scores, state.step)
    if settings.rounding > 0:
        value = value + rounding_weight(settings, state.step) * _rounding_penalty(
            settings, state.params, scores)
    return value


def advance_gates(settings: GateSettings, state: SparseState) -> SparseState:
    """The update after the optimizer: clipping to ``score_bounds``, the controller on
    ``lam``, the lift, the step."""
    scores, bounds = state.scores, settings.bounds
    if bounds is not None:
        scores = jax.tree_util.tree_map(lambda s: jnp.clip(s, *bounds), scores)
    lam_now = state.extra["lam"]
    if settings.sparsity is not None:  # a target: the controller (and the lift)
        error = (open_density(settings, state.params, scores)
                 - target_density(settings, state.step + 1))
        lam_now = jnp.maximum(lam_now + settings.lam_rate * error, 0.0).astype(jnp.float32)
        if settings.lift_rate > 0:
            lift = settings.lift_rate * jnp.maximum(-error, 0.0)
            if not settings.lift_with_lam:  # while lam closes gates, it is not undone
                lift = jnp.where(lam_now > 0, 0.0, lift)

            def raise_gates(s: jax.Array) -> jax.Array:
                up = s + lift.astype(s.dtype)
                if settings.lift_scope == "closed":
                    up = jnp.where(settings.form.test_gate(s) > 0, s, up)
                return up if bounds is None else jnp.clip(up, *bounds)

            scores = jax.tree_util.tree_map(raise_gates, scores)
    return state.replace(step=state.step + 1, scores=scores,
                         extra={**state.extra, "lam": lam_now})


def _update(settings: GateSettings, optimizer: optax.GradientTransformation,
            state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
    scores, opt_state = apply_optimizer(optimizer, grads, state.opt_state, state.scores,
                                        **extra_args)
    return advance_gates(settings, state.replace(scores=scores, opt_state=opt_state))


def _masked_params(state: SparseState, masks: PyTree) -> PyTree:
    return zero_masked(state.params, masks)


def gates(
    optimizer: optax.GradientTransformation,
    *,
    gate: str = "gaussian",
    sparsity: float | None = None,
    lam: float | None = None,
    lam_rate: float = 0.05,
    ramp: float = 0.5,
    sigma: float = 0.5,
    sigma_final: float | None = None,
    mu_init: float | None = None,
    drop_init: float | None = None,
    binarize: str | None = None,
    score_bounds: tuple[float, float] | None = None,
    rounding: float = 0.0,
    lift_rate: float | None = None,
    lift_scope: str = "all",
    lift_with_lam: bool = False,
    noise: str = "fresh",
    weight_init: str = "signed_constant",
    total_steps: int | None = None,
    prunable: Prunable = default_prunable,
) -> Method:
    """Strong lottery tickets with relaxed Bernoulli gates over frozen weights
    (Tsayag & Lindenbaum 2026), in the gate forms of Yamada et al. 2020 (``'gaussian'``)
    and Louizos et al. 2018 (``'hard_concrete'``).

    Args:
      optimizer: trains the gate parameters (``state.scores``).
      gate: ``'gaussian'`` or ``'hard_concrete'`` (see the module docstring).
      sparsity: target fraction of prunable weights removed. With it, ``lam`` is set by a
        controller (``lam`` is then its starting value, default 0) and the default
        ``binarize`` rule is ``'exact'``, so the final mask has exactly this sparsity.
        Without it, ``lam`` is a fixed penalty weight (default 1.0).
      lam: weight of the penalty ``lam * mean over gates of P(z > 0)``.
      lam_rate: step size of the controller (change of ``lam`` per step per unit of
        density error).
      ramp: fraction of ``total_steps`` over which the target density goes from 1 to
        ``1 - sparsity`` (cubic); 0 (or no ``total_steps``) targets it from step 0.
      sigma: noise scale of the Gaussian gate.
      sigma_final: Gaussian gate only: the noise scale decays from ``sigma`` at step 0 to
        ``sigma_final`` at ``total_steps`` (cosine; needs ``total_steps``); the penalty
        ``Phi(mu / sigma_t)`` uses the current scale. Default: ``sigma`` throughout.
      mu_init: initial ``mu`` of the Gaussian gate (default 0.5).
      drop_init: initial drop probability ``p`` of the hard-concrete gate (default 0.5).
      binarize: how the hard mask is derived: ``'open'``, ``'half'``, ``'topk'`` or
        ``'exact'`` (the last two need a target sparsity).
      score_bounds: ``(low, high)``: after each update the gate parameters are clipped to
        this interval (default: not clipped). A clipped gate gets no gradient once
        ``mu + eps`` stays above 1 (or below 0), and its penalty gradient ``phi(mu /
        sigma)`` vanishes, so without bounds gates that ran far above 1 can no longer be
        closed by the controller; e.g. ``(-1.0, 1.5)`` for the Gaussian gate keeps every
        gate within reach.
      rounding: weight of a rounding penalty ``rounding * r_t * mean(c * (1 - c))`` over the
        test gates ``c`` in [0, 1], which pushes every gate out of the soft middle towards
        0 or 1, so that the binary mask computes what training computed. ``r_t`` is 0 until
        the end of the density ramp and then rises linearly to 1 at ``total_steps``
        (needs ``total_steps``). Default 0: no rounding penalty.
      lift_rate: with a target sparsity: after every step in which fewer gates are open at
        test time than the target density asks, the gate parameters are raised by
        ``lift_rate * (target density - open density)`` (then clipped to
        ``score_bounds``): a shift of the opening threshold, outside the optimizer, that
        opens the closed gates closest to opening, the ones the ``'exact'`` rule would
        add at the end, so that training uses the mask that is kept. The controller on
        ``lam`` can only close gates (``lam >= 0``); this opens them. Default: 2.0 with
        a target sparsity, 0 (off) without one; 0 trains as before the lift existed.
      lift_scope: which gates the lift raises: ``'all'`` (default; every gate, a rigid
        shift, so the open gates run into the upper bound) or ``'closed'`` (only the
        closed ones; they bunch up below the threshold and open together, overshooting
        the target at a large ``lift_rate``, see experiments/gates_exact_sparsity.py).
      lift_with_lam: lift also while ``lam > 0``. Default ``False``: the lift waits until
        the controller has let ``lam`` fall to 0, so that the two never fight (on
        LeNet-300-100 at 90-95% the fight, lam closing the gates the lift raised, cost
        1.2-5 points of accuracy; see experiments/gates_exact_sparsity.py).
      noise: ``'fresh'`` (default): new noise for every gate at every step. ``'pool'``:
        ``2 N`` draws (N gates) made once at init and kept in ``state.extra``; each step
        reads a window of ``N`` consecutive draws at a uniformly random offset. Every gate
        gets a draw of the same distribution, independent of the others in the step, and
        a gate meets the same draw again in two steps only if their offsets are equal
        (chance ``1 / (N + 1)``). It replaces the step's random-number generation (on
        CPU about a dense step's time on LeNet-300-100) by a copy, at the cost of two
        floats of memory per gate (docs/benchmarks.md).
      weight_init: one of :data:`sparsejax.methods.strong_init.WEIGHT_INITS` (default: signed
        Kaiming constant, Edge-Popup's best), drawn once at init by
        :func:`sparsejax.methods.strong_init.init_weights`; the ``scaled_*`` variants divide the
        scale by ``sqrt(1 - sparsity)`` and need a target sparsity.
      total_steps: the run's length (the harness passes it), for the ramp.
      prunable: which leaves get gates; the others are used as they are.

    >>> import jax, jax.numpy as jnp, optax
    >>> method = gates(optax.adam(0.1), gate="hard_concrete", sparsity=0.5)
    >>> state = method.init({"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}, jax.random.PRNGKey(0))
    >>> state.scores["w"].shape, state.scores["b"].shape  # no gates on the bias
    ((4, 4), (0,))
    >>> masks = method.hard_masks(state)
    >>> int(masks["w"].sum()), bool(masks["b"].all()), bool(state.masks["w"].all())
    (8, True, True)
    >>> eff = method.effective_params(state)["w"]
    >>> bool(jnp.all((eff == 0) | (eff == state.params["w"])))
    True
    """
    settings = gate_settings(
        gate=gate, sparsity=sparsity, lam=lam, lam_rate=lam_rate, ramp=ramp, sigma=sigma,
        sigma_final=sigma_final, mu_init=mu_init, drop_init=drop_init, binarize=binarize,
        score_bounds=score_bounds, rounding=rounding, lift_rate=lift_rate,
        lift_scope=lift_scope, lift_with_lam=lift_with_lam, noise=noise,
        weight_init=weight_init, total_steps=total_steps, prunable=prunable)
    hard_masks = functools.partial(gate_masks, settings)
    method = Method(
        name="gates",
        init=functools.partial(init_gates, settings, optimizer),
        trainables=lambda state: state.scores,
        materialize=functools.partial(gated_weights, settings),
        update=functools.partial(_update, settings, optimizer),
        effective_params=lambda state: _masked_params(state, hard_masks(state)),
        penalty=functools.partial(gate_penalty, settings),
        hard_masks=hard_masks,
        masked_params=_masked_params,
        relaxed_forward=True,
    )
    return method._replace(outside=OutsideLoop(
        with_trainables=lambda state, scores: state.replace(scores=scores),
        advance=functools.partial(advance_gates, settings),
        refresh=lambda state: state, trains_weights=False, scores_layout="like_params",
        reads_step=True))


register_method("gates", gates)
