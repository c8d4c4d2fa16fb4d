"""Continuously relaxed Bernoulli gates over frozen weights (Gaussian stochastic gates and
hard-concrete L0 gates): strong lottery tickets without a straight-through estimator.

Every prunable weight ``w`` gets one gate parameter ``g`` (kept in ``state.scores``); the
weights never change. In training the forward pass uses ``w * z`` with a random gate
``z = gate(g, noise)`` in [0, 1] drawn from :func:`~sparsejax.methods.base.step_key`, and
the loss adds ``lam * mean(P(z > 0))``, the expected fraction of open gates (an expected-L0
penalty, normalised by the number of gates so that ``lam`` means the same on every
model). The gradient reaches ``g`` through the reparameterisation ``z(g, noise)`` by plain
automatic differentiation (no ``custom_vjp``).

Gate forms (see ``shared/REFERENCES.md``):

* ``gaussian`` (stochastic gates, Yamada et al. 2020): ``z = clip(mu + eps, 0, 1)`` with
  ``eps ~ N(0, sigma^2)``; ``P(z > 0) = Phi(mu / sigma)``; test gate ``clip(mu, 0, 1)``.
* ``hard_concrete`` (Louizos et al. 2018): ``s = sigmoid((log u - log(1-u) + log_alpha) /
  beta)``, ``z = clip(s * (zeta - gamma) + gamma, 0, 1)`` with ``u ~ U(0, 1)``;
  ``P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``; test gate
  ``clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``.

Evaluation and export use ``effective_params = w * m`` with a hard binary mask ``m``
(``method.hard_masks(state)``), derived from the gate parameters by the ``binarize`` rule
when it is asked for, never in a training step, which does not read it:

* ``'open'``: ``m = test gate > 0`` (default without a target sparsity);
* ``'half'``: ``m = test gate > 0.5``;
* ``'exact'`` (default with a target sparsity): exactly ``k = num_kept(1 - sparsity, N)``
  gates, those with the largest parameters (``mu`` or ``log_alpha``, which order the test
  gate and ``P(z > 0)`` alike) over all prunable leaves jointly (ties in leaf order, then
  row-major order). Since the test gate is monotone in its parameter, these are the gates
  open at test time by parameter and, when fewer than ``k`` are open, the closed gates
  closest to opening to fill up to ``k``: the mask's sparsity is the target by
  construction. (With the annealed noise of the tuned recipe the loss alone closes more
  gates than the target asks, and the controller, which can only close gates, does not
  act then; ``'topk'`` left the masks 0.4-12 points sparser than the target. Gates
  switched on only by this rule were closed in training, which costs accuracy, up to
  1.6 points at 50% on LeNet-300-100: ``lift_rate`` below opens them during training,
  so that the rule has next to nothing to fill; see experiments/gates_exact_sparsity.py.)
* ``'topk'``: of the gates open at test time, those with the largest parameters, at most
  ``k`` of them. A gate closed at test time is never switched on, so the mask's sparsity
  is the target or, when the controller closed more gates than needed, above it.

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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.core._tree import path_str
from sparsejax.core.distributions import warn_empty_layers
from sparsejax.core.masks import Prunable, default_prunable, dense_masks, prunable_leaves
from sparsejax.core.schedules import cubic_sparsity
from sparsejax.core.topk import num_kept, topk_mask
from sparsejax.core.transforms import zero_masked
from sparsejax.core.validation import check_sparsity
from sparsejax.methods.base import (
    InitContext,
    Method,
    OutsideLoop,
    SparseState,
    apply_optimizer,
    draws_per_leaf,
    step_key,
)
from sparsejax.methods.registry import register_method
from sparsejax.methods.strong import WEIGHT_INITS, init_weights

__all__ = [
    "GateForm",
    "GATE_FORMS",
    "BINARIZE_RULES",
    "gaussian_gate",
    "hard_concrete_gate",
    "gates",
]

PyTree = Any

HC_BETA = 2.0 / 3.0
HC_GAMMA = -0.1
HC_ZETA = 1.1
_UNIFORM_EPS = 1e-6  # u is drawn from [eps, 1 - eps] so that log u and log(1-u) are finite

BINARIZE_RULES = ("open", "half", "topk", "exact")


def _normal_cdf(x: jax.Array) -> jax.Array:
    """``Phi(x)`` as ``(1 + erf(x / sqrt 2)) / 2``: one ``erf`` where ``ndtr`` evaluates
    both ``erf`` and ``erfc`` (2x the time on CPU). Below ``x = -5`` it loses relative, not
    absolute, precision (error under 1e-7), which a mean over gates does not notice."""
    return 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class GateForm(NamedTuple):
    """One relaxed Bernoulli gate, as pure elementwise functions of the gate parameter.

    Attributes:
      name: ``'gaussian'`` or ``'hard_concrete'``.
      init: ``(key, shape) -> gate parameters``.
      noise: ``(key, shape) -> noise``, the parameter-free randomness (``eps`` or ``u``).
      relax: ``(g, noise) -> z`` the training gate in [0, 1], differentiable in ``g``.
      prob_open: ``g -> P(z > 0)``, whose mean is the expected-L0 penalty.
      test_gate: ``g -> `` the deterministic gate in [0, 1] (no noise).
    """

    name: str
    init: Callable[[jax.Array, tuple[int, ...]], jax.Array]
    noise: Callable[[jax.Array, tuple[int, ...]], jax.Array]
    relax: Callable[[jax.Array, jax.Array], jax.Array]
    prob_open: Callable[[jax.Array], jax.Array]
    test_gate: Callable[[jax.Array], jax.Array]

    def sample(self, g: jax.Array, key: jax.Array) -> jax.Array:
        """A training gate ``relax(g, noise(key))`` with fresh noise from ``key``."""
        return self.relax(g, self.noise(key, jnp.shape(g)))


def gaussian_gate(sigma: float = 0.5, mu_init: float = 0.5) -> GateForm:
    """Gaussian stochastic gates: ``z = clip(mu + eps, 0, 1)``, ``eps ~ N(0, sigma^2)``.

    >>> import jax.numpy as jnp
    >>> form = gaussian_gate(sigma=0.5)
    >>> [round(float(v), 4) for v in form.prob_open(jnp.array([0.0, 0.5]))]  # Phi(mu/sigma)
    [0.5, 0.8413]
    >>> form.test_gate(jnp.array([-0.2, 0.3, 1.7]))
    Array([0. , 0.3, 1. ], dtype=float32)
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if not math.isfinite(mu_init):
        raise ValueError(f"mu_init must be finite, got {mu_init!r}")

    def init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        del key
        return jnp.full(shape, mu_init, jnp.float32)

    def noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return sigma * jax.random.normal(key, shape, jnp.float32)

    return GateForm(
        name="gaussian",
        init=init,
        noise=noise,
        relax=lambda mu, eps: jnp.clip(mu + eps, 0.0, 1.0),
        prob_open=lambda mu: _normal_cdf(mu / sigma),
        test_gate=lambda mu: jnp.clip(mu, 0.0, 1.0),
    )


def hard_concrete_gate(drop_init: float = 0.5, beta: float = HC_BETA, gamma: float = HC_GAMMA,
                       zeta: float = HC_ZETA) -> GateForm:
    """Hard-concrete L0 gates (Louizos et al. 2018) with parameters ``log_alpha``.

    ``log_alpha`` starts at ``N(log((1 - p) / p), 0.01^2)`` with ``p = drop_init``.

    >>> import jax.numpy as jnp
    >>> form = hard_concrete_gate()
    >>> round(float(form.prob_open(jnp.array(0.0))), 4)  # sigmoid(-beta log(-gamma/zeta))
    0.8318
    >>> round(float(form.test_gate(jnp.array(0.0))), 4)  # 0.5 * 1.2 - 0.1
    0.5
    """
    if not 0.0 < drop_init < 1.0:
        raise ValueError(f"drop_init must lie in (0, 1), got {drop_init!r}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta!r}")
    if not (gamma < 0.0 and zeta > 1.0):
        raise ValueError(f"need gamma < 0 and zeta > 1 (a stretched interval), got "
                         f"gamma={gamma!r}, zeta={zeta!r}")
    mean = math.log((1.0 - drop_init) / drop_init)
    shift = beta * math.log(-gamma / zeta)

    def init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return mean + 0.01 * jax.random.normal(key, shape, jnp.float32)

    def stretch(s: jax.Array) -> jax.Array:
        return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)

    def noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.uniform(key, shape, jnp.float32, _UNIFORM_EPS, 1.0 - _UNIFORM_EPS)

    def relax(log_alpha: jax.Array, u: jax.Array) -> jax.Array:
        return stretch(jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta))

    return GateForm(
        name="hard_concrete",
        init=init,
        noise=noise,
        relax=relax,
        prob_open=lambda log_alpha: jax.nn.sigmoid(log_alpha - shift),
        test_gate=lambda log_alpha: stretch(jax.nn.sigmoid(log_alpha)),
    )


GATE_FORMS: dict[str, Callable[..., GateForm]] = {
    "gaussian": gaussian_gate,
    "hard_concrete": hard_concrete_gate,
}


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
      weight_init: one of :data:`sparsejax.methods.strong.WEIGHT_INITS` (default: signed
        Kaiming constant, Edge-Popup's best), drawn once at init by
        :func:`sparsejax.methods.strong.init_weights`; the ``scaled_*`` variants divide the
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
    if gate not in GATE_FORMS:
        raise ValueError(f"unknown gate {gate!r}; known: {', '.join(GATE_FORMS)}")
    if gate == "gaussian":
        if drop_init is not None:
            raise ValueError("drop_init belongs to gate='hard_concrete'; use mu_init")
        form = gaussian_gate(sigma, 0.5 if mu_init is None else float(mu_init))
    else:
        if mu_init is not None:
            raise ValueError("mu_init belongs to gate='gaussian'; use drop_init")
        form = hard_concrete_gate(0.5 if drop_init is None else float(drop_init))
    if sigma_final is not None:
        if gate != "gaussian":
            raise ValueError("sigma_final belongs to gate='gaussian'")
        if not (sigma_final > 0 and math.isfinite(sigma_final)):
            raise ValueError(f"sigma_final must be a positive number, got {sigma_final!r}")
        if total_steps is None:
            raise ValueError("sigma_final needs total_steps (the harness passes it)")
    if sparsity is not None:
        check_sparsity(sparsity)
    if not (math.isfinite(rounding) and rounding >= 0):
        raise ValueError(f"rounding must be a finite number >= 0, got {rounding!r}")
    if rounding > 0 and total_steps is None:
        raise ValueError("rounding needs total_steps (the harness passes it)")
    if lift_rate is None:
        lift_rate = 2.0 if sparsity is not None else 0.0
    if not (math.isfinite(lift_rate) and lift_rate >= 0):
        raise ValueError(f"lift_rate must be a finite number >= 0, got {lift_rate!r}")
    if lift_rate > 0 and sparsity is None:
        raise ValueError("lift_rate needs a target sparsity")
    if lift_scope not in ("closed", "all"):
        raise ValueError(f"lift_scope must be 'closed' or 'all', got {lift_scope!r}")
    if noise not in ("fresh", "pool"):
        raise ValueError(f"noise must be 'fresh' (new draws every step) or 'pool' (a window "
                         f"of a pool drawn once, at a random offset each step), got {noise!r}")
    binarize = binarize or ("exact" if sparsity is not None else "open")
    if binarize not in BINARIZE_RULES:
        raise ValueError(f"unknown binarize rule {binarize!r}; known: {', '.join(BINARIZE_RULES)}")
    if binarize in ("topk", "exact") and sparsity is None:
        raise ValueError(f"binarize={binarize!r} needs a target sparsity")
    if lam is None:
        lam = 0.0 if sparsity is not None else 1.0
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not (math.isfinite(lam_rate) and lam_rate >= 0):
        raise ValueError(f"lam_rate must be a finite number >= 0, got {lam_rate!r}")
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must lie in [0, 1], got {ramp!r}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"unknown weight init {weight_init!r}; known: {', '.join(WEIGHT_INITS)}")
    if weight_init.startswith("scaled_") and sparsity is None:
        raise ValueError(f"weight_init={weight_init!r} needs a target sparsity")
    if score_bounds is not None:
        if len(score_bounds) != 2 or not float(score_bounds[0]) < float(score_bounds[1]):
            raise ValueError(f"score_bounds must be (low, high) with low < high, got "
                             f"{score_bounds!r}")
        low, high = float(score_bounds[0]), float(score_bounds[1])
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    density = 1.0 if sparsity is None else 1.0 - sparsity
    ramp_steps = int(ramp * total_steps) if total_steps is not None else 0
    if sparsity is None:
        target_density: Callable[[jax.Array], jax.Array] | None = None
    elif ramp_steps > 0:
        schedule = cubic_sparsity(sparsity, begin_step=0, end_step=ramp_steps)
        target_density = lambda step: 1.0 - schedule(step)  # noqa: E731
    else:
        target_density = lambda step: jnp.float32(density)  # noqa: E731

    def flags(params: PyTree) -> list[bool]:
        return jax.tree_util.tree_leaves(prunable_leaves(params, prunable))

    def gated(params: PyTree, scores: PyTree) -> list[jax.Array]:
        """The gate parameters of the prunable leaves, in leaf order."""
        return [s for s, f in zip(jax.tree_util.tree_leaves(scores), flags(params), strict=True)
                if f]

    def noise_factor(step: jax.Array) -> jax.Array:
        """``sigma_t / sigma`` at ``step`` (1 without ``sigma_final``)."""
        if sigma_final is None:
            return jnp.float32(1.0)
        t = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
        return 1.0 + (sigma_final / sigma - 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * t))

    def prob_open(s: jax.Array, step: jax.Array) -> jax.Array:
        if sigma_final is None:
            return form.prob_open(s)
        return _normal_cdf(s / (sigma * noise_factor(step)))

    def gate_mean(params: PyTree, scores: PyTree,
                  per_gate: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """The mean of ``per_gate(g)`` over every gate parameter ``g`` (0 without gates)."""
        leaves = gated(params, scores)
        total = sum(int(s.size) for s in leaves)
        if total == 0:
            return jnp.float32(0.0)
        return sum(jnp.sum(per_gate(s)) for s in leaves) / total

    def expected_density(params: PyTree, scores: PyTree, step: jax.Array) -> jax.Array:
        return gate_mean(params, scores, lambda s: prob_open(s, step))

    def open_density(params: PyTree, scores: PyTree) -> jax.Array:
        # 1.0 per open gate, summed in float32: exact up to 2**24 gates per leaf, and
        # twice as fast on CPU as an int32 sum of the booleans.
        return gate_mean(params, scores,
                         lambda s: jnp.where(form.test_gate(s) > 0, 1.0, 0.0))

    def hard_masks(state: SparseState) -> PyTree:
        """The binary masks of ``state``'s gate parameters by the ``binarize`` rule."""
        treedef = jax.tree_util.tree_structure(state.params)
        is_gated = flags(state.params)
        score_leaves = jax.tree_util.tree_leaves(state.scores)
        if binarize in ("topk", "exact"):
            chosen = iter(topk_mask(
                [s for s, f in zip(score_leaves, is_gated, strict=True) if f], density,
                scope="global", check_finite_scores=False))
        masks = []
        for leaf, s, f in zip(treedef.flatten_up_to(state.params), score_leaves, is_gated,
                              strict=True):
            if not f:
                masks.append(jnp.ones(jnp.shape(leaf), bool))
            elif binarize == "exact":
                masks.append(next(chosen))
            elif binarize == "topk":
                masks.append(next(chosen) & (form.test_gate(s) > 0))
            else:
                masks.append(form.test_gate(s) > (0.0 if binarize == "open" else 0.5))
        return jax.tree_util.tree_unflatten(treedef, masks)

    def init(params: PyTree, rng: jax.Array, model_state: Any = None,
             context: InitContext | None = None) -> SparseState:
        del context
        weight_key, gate_key = jax.random.split(jax.random.fold_in(rng, 0x67617465))
        params = init_weights(params, weight_key, weight_init, density=density,
                              prunable=prunable)
        is_gated, treedef = jax.tree_util.tree_flatten(prunable_leaves(params, prunable))
        leaves = treedef.flatten_up_to(params)
        gated = sum(math.prod(jnp.shape(p)) for p, f in zip(leaves, is_gated, strict=True)
                    if f)
        if binarize in ("topk", "exact") and gated and num_kept(density, gated) == 0:
            warn_empty_layers(density, [path_str(p) for (p, _), f in zip(
                jax.tree_util.tree_flatten_with_path(params)[0], is_gated, strict=True)
                if f])
        keys = jax.random.split(gate_key, max(len(leaves), 1))
        scores = jax.tree_util.tree_unflatten(treedef, [
            form.init(k, jnp.shape(p)) if f else jnp.zeros((0,), jnp.float32)
            for k, p, f in zip(keys, leaves, is_gated, strict=True)])
        extra = {"lam": jnp.float32(lam)}
        if noise == "pool":
            # twice as many draws as gates: each step reads a window of one draw per gate
            # at a random offset (materialize)
            size = sum(int(jnp.size(p)) for p, f in zip(leaves, is_gated, strict=True) if f)
            extra["noise_pool"] = form.noise(jax.random.fold_in(rng, 0x706F6F6C), (2 * size,))
        return SparseState.create(
            params=params, rng=rng, opt_state=optimizer.init(scores), scores=scores,
            masks=dense_masks(params), model_state=model_state, extra=extra)

    def step_noise(state: SparseState, key: jax.Array, shapes: list[tuple[int, ...]],
                   is_gated: list[bool]) -> list[jax.Array | None]:
        """This step's noise per leaf (None where a leaf has no gates): fresh draws, one key
        per leaf, or (``noise='pool'``) a window of the pool at a random offset, cut into
        the gated leaves' shapes."""
        if noise == "fresh":
            return draws_per_leaf(key, shapes, form.noise, is_gated)
        pool = state.extra["noise_pool"]
        size = pool.shape[0] // 2
        window = jax.lax.dynamic_slice(pool, (jax.random.randint(key, (), 0, size + 1),),
                                       (size,))
        gated = [shape for shape, f in zip(shapes, is_gated, strict=True) if f]
        parts = iter(jnp.split(window, np.cumsum([math.prod(g) for g in gated])[:-1]))
        return [next(parts).reshape(shape) if f else None
                for shape, f in zip(shapes, is_gated, strict=True)]

    def materialize(state: SparseState, scores: PyTree) -> PyTree:
        is_gated, treedef = jax.tree_util.tree_flatten(prunable_leaves(state.params, prunable))
        factor = noise_factor(state.step)
        weights = treedef.flatten_up_to(state.params)
        draws = step_noise(state, step_key(state, 0x7A), [jnp.shape(w) for w in weights],
                           is_gated)

        def sample(s: jax.Array, eps: jax.Array) -> jax.Array:
            return form.relax(s, eps if sigma_final is None else factor * eps)

        out = [sample(s, eps).astype(jnp.result_type(w)) * w if f else w
               for w, s, eps, f in zip(weights, jax.tree_util.tree_leaves(scores), draws,
                                       is_gated, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out)

    def rounding_weight(step: jax.Array) -> jax.Array:
        """``rounding * r_t``: 0 until the ramp ends, then linear to ``rounding``."""
        start = ramp_steps if target_density is not None else 0
        span = max(total_steps - start, 1)
        t = jnp.clip((jnp.asarray(step, jnp.float32) - start) / span, 0.0, 1.0)
        return rounding * t

    def rounding_penalty(params: PyTree, scores: PyTree) -> jax.Array:
        def per_gate(s: jax.Array) -> jax.Array:
            c = form.test_gate(s)
            return c * (1.0 - c)

        return gate_mean(params, scores, per_gate)

    def penalty(state: SparseState, scores: PyTree) -> jax.Array:
        value = state.extra["lam"] * expected_density(state.params, scores, state.step)
        if rounding > 0:
            value = value + rounding_weight(state.step) * rounding_penalty(state.params, scores)
        return value

    def advance(state: SparseState) -> SparseState:
        """The update after the optimizer: clipping, the controller, the step."""
        scores = state.scores
        if score_bounds is not None:
            scores = jax.tree_util.tree_map(lambda s: jnp.clip(s, low, high), scores)
        lam_now = state.extra["lam"]
        if target_density is not None:
            error = open_density(state.params, scores) - target_density(state.step + 1)
            lam_now = jnp.maximum(lam_now + lam_rate * error, 0.0).astype(jnp.float32)
            if lift_rate > 0:
                lift = lift_rate * jnp.maximum(-error, 0.0)
                if not lift_with_lam:  # while lam closes gates, it is not undone
                    lift = jnp.where(lam_now > 0, 0.0, lift)

                def raise_gates(s: jax.Array) -> jax.Array:
                    up = s + lift.astype(s.dtype)
                    if lift_scope == "closed":
                        up = jnp.where(form.test_gate(s) > 0, s, up)
                    return up if score_bounds is None else jnp.clip(up, low, high)

                scores = jax.tree_util.tree_map(raise_gates, scores)
        return state.replace(step=state.step + 1, scores=scores,
                             extra={**state.extra, "lam": lam_now})

    def update(state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
        scores, opt_state = apply_optimizer(optimizer, grads, state.opt_state, state.scores,
                                            **extra_args)
        return advance(state.replace(scores=scores, opt_state=opt_state))

    def masked_params(state: SparseState, masks: PyTree) -> PyTree:
        return zero_masked(state.params, masks)

    method = Method(
        name="gates",
        init=init,
        trainables=lambda state: state.scores,
        materialize=materialize,
        update=update,
        effective_params=lambda state: masked_params(state, hard_masks(state)),
        penalty=penalty,
        hard_masks=hard_masks,
        masked_params=masked_params,
    )
    return method._replace(outside=OutsideLoop(
        with_trainables=lambda state, scores: state.replace(scores=scores), advance=advance,
        refresh=lambda state: state, trains_weights=False, scores_layout="like_params",
        reads_step=True))


register_method("gates", gates)
