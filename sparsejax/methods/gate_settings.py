"""The options of :func:`sparsejax.gates`, checked once into a :class:`GateSettings`, and
the schedules that follow from them (target density, noise scale, rounding weight).

Every piece of the gates method (:mod:`sparsejax.methods.gates`) is a function of a
``GateSettings`` and its arguments, so each can be called and tested alone.

>>> settings = gate_settings(sparsity=0.9, total_steps=100)
>>> settings.binarize, settings.lift_rate, settings.ramp_steps
('exact', 2.0, 50)
>>> round(float(target_density(settings, 50)), 4), round(float(target_density(settings, 0)), 4)
(0.1, 1.0)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.schedules import cubic_sparsity
from sparsejax.core.validation import check_sparsity
from sparsejax.methods.gate_forms import GATE_FORMS, GateForm, gaussian_gate, hard_concrete_gate
from sparsejax.methods.strong_init import WEIGHT_INITS

__all__ = ["BINARIZE_RULES", "GateSettings", "gate_settings", "target_density",
           "noise_factor", "rounding_weight"]

BINARIZE_RULES = ("open", "half", "topk", "exact")


class GateSettings(NamedTuple):
    """The checked options of :func:`sparsejax.gates` (documented there), with their
    defaults resolved: ``density`` is ``1 - sparsity`` (1 without a target),
    ``ramp_steps`` the steps of the density ramp, ``bounds`` the ``score_bounds`` as floats."""

    form: GateForm
    prunable: Prunable
    sparsity: float | None
    density: float
    lam: float
    lam_rate: float
    ramp_steps: int
    sigma: float
    sigma_final: float | None
    binarize: str
    bounds: tuple[float, float] | None
    rounding: float
    lift_rate: float
    lift_scope: str
    lift_with_lam: bool
    noise: str
    weight_init: str
    total_steps: int | None


def _gate_form(gate: str, sigma: float, mu_init: float | None, drop_init: float | None,
               sigma_final: float | None, total_steps: int | None) -> GateForm:
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
    return form


def _check_finite_at_least_zero(name: str, value: Any) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def gate_settings(*, gate: str = "gaussian", sparsity: float | None = None,
                  lam: float | None = None, lam_rate: float = 0.05, ramp: float = 0.5,
                  sigma: float = 0.5, sigma_final: float | None = None,
                  mu_init: float | None = None, drop_init: float | None = None,
                  binarize: str | None = None,
                  score_bounds: tuple[float, float] | None = None, rounding: float = 0.0,
                  lift_rate: float | None = None, lift_scope: str = "all",
                  lift_with_lam: bool = False, noise: str = "fresh",
                  weight_init: str = "signed_constant", total_steps: int | None = None,
                  prunable: Prunable = default_prunable) -> GateSettings:
    """Check the options of :func:`sparsejax.gates` and resolve their defaults; a
    ``ValueError`` names the first option that is wrong."""
    form = _gate_form(gate, sigma, mu_init, drop_init, sigma_final, total_steps)
    if sparsity is not None:
        check_sparsity(sparsity)
    _check_finite_at_least_zero("rounding", rounding)
    if rounding > 0 and total_steps is None:
        raise ValueError("rounding needs total_steps (the harness passes it)")
    if lift_rate is None:
        lift_rate = 2.0 if sparsity is not None else 0.0
    _check_finite_at_least_zero("lift_rate", lift_rate)
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
    _check_finite_at_least_zero("lam", lam)
    _check_finite_at_least_zero("lam_rate", lam_rate)
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must lie in [0, 1], got {ramp!r}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"unknown weight init {weight_init!r}; known: {', '.join(WEIGHT_INITS)}")
    if weight_init.startswith("scaled_") and sparsity is None:
        raise ValueError(f"weight_init={weight_init!r} needs a target sparsity")
    bounds = None
    if score_bounds is not None:
        if len(score_bounds) != 2 or not float(score_bounds[0]) < float(score_bounds[1]):
            raise ValueError(f"score_bounds must be (low, high) with low < high, got "
                             f"{score_bounds!r}")
        bounds = (float(score_bounds[0]), float(score_bounds[1]))
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return GateSettings(
        form=form, prunable=prunable, sparsity=sparsity,
        density=1.0 if sparsity is None else 1.0 - sparsity, lam=lam, lam_rate=lam_rate,
        ramp_steps=int(ramp * total_steps) if total_steps is not None else 0, sigma=sigma,
        sigma_final=sigma_final, binarize=binarize, bounds=bounds, rounding=rounding,
        lift_rate=lift_rate, lift_scope=lift_scope, lift_with_lam=lift_with_lam, noise=noise,
        weight_init=weight_init, total_steps=total_steps)


def target_density(settings: GateSettings, step: Any) -> jax.Array | None:
    """The density the controller aims at after ``step``: cubic from 1 to ``1 - sparsity``
    over the ramp, then constant; ``None`` without a target sparsity."""
    if settings.sparsity is None:
        return None
    if settings.ramp_steps > 0:
        schedule = cubic_sparsity(settings.sparsity, begin_step=0, end_step=settings.ramp_steps)
        return 1.0 - schedule(step)
    return jnp.float32(settings.density)


def noise_factor(settings: GateSettings, step: Any) -> jax.Array:
    """``sigma_t / sigma`` at ``step``: cosine from 1 to ``sigma_final / sigma`` at
    ``total_steps`` (1 without ``sigma_final``).

    >>> s = gate_settings(sigma=0.5, sigma_final=0.1, total_steps=10)
    >>> [round(float(noise_factor(s, t)), 3) for t in (0, 5, 10)]
    [1.0, 0.6, 0.2]
    """
    if settings.sigma_final is None:
        return jnp.float32(1.0)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / settings.total_steps, 0.0, 1.0)
    return 1.0 + (settings.sigma_final / settings.sigma - 1.0) * 0.5 * (1.0 - jnp.cos(jnp.pi * t))


def rounding_weight(settings: GateSettings, step: Any) -> jax.Array:
    """``rounding * r_t``: 0 until the density ramp ends, then linear to ``rounding`` at
    ``total_steps``.

    >>> s = gate_settings(sparsity=0.5, rounding=1.0, total_steps=100, ramp=0.5)
    >>> [float(rounding_weight(s, t)) for t in (50, 75, 100)]
    [0.0, 0.5, 1.0]
    """
    start = settings.ramp_steps if settings.sparsity is not None else 0
    span = max(settings.total_steps - start, 1)
    t = jnp.clip((jnp.asarray(step, jnp.float32) - start) / span, 0.0, 1.0)
    return settings.rounding * t
