"""The relaxed Bernoulli gates themselves, as pure elementwise functions of a gate
parameter (see ``shared/REFERENCES.md``), for :func:`sparsejax.gates`:

* ``gaussian`` (stochastic gates, Yamada et al. 2020): ``z = clip(mu + eps, 0, 1)`` with
  ``eps ~ N(0, sigma^2)``; ``P(z > 0) = Phi(mu / sigma)``; test gate ``clip(mu, 0, 1)``.
* ``hard_concrete`` (Louizos et al. 2018): ``s = sigmoid((log u - log(1-u) + log_alpha) /
  beta)``, ``z = clip(s * (zeta - gamma) + gamma, 0, 1)`` with ``u ~ U(0, 1)``;
  ``P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``; test gate
  ``clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsejax.methods.draws import NormalDraw, ScaledDraw, UniformDraw

__all__ = ["GateForm", "GATE_FORMS", "gaussian_gate", "hard_concrete_gate", "normal_cdf"]

HC_BETA = 2.0 / 3.0
HC_GAMMA = -0.1
HC_ZETA = 1.1
_UNIFORM_EPS = 1e-6  # u is drawn from [eps, 1 - eps] so that log u and log(1-u) are finite

def normal_cdf(x: jax.Array) -> jax.Array:
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

    return GateForm(
        name="gaussian",
        init=init,
        noise=ScaledDraw(NormalDraw(), sigma),  # sigma * N(0, 1)
        relax=lambda mu, eps: jnp.clip(mu + eps, 0.0, 1.0),
        prob_open=lambda mu: normal_cdf(mu / sigma),
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

    def stretch(s: jax.Array) -> jax.Array:
        return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)

    def relax(log_alpha: jax.Array, u: jax.Array) -> jax.Array:
        return stretch(jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta))

    return GateForm(
        name="hard_concrete",
        init=ScaledDraw(NormalDraw(), 0.01, mean),  # mean + 0.01 * N(0, 1)
        noise=UniformDraw(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS),
        relax=relax,
        prob_open=lambda log_alpha: jax.nn.sigmoid(log_alpha - shift),
        test_gate=lambda log_alpha: stretch(jax.nn.sigmoid(log_alpha)),
    )


GATE_FORMS: dict[str, Callable[..., GateForm]] = {
    "gaussian": gaussian_gate,
    "hard_concrete": hard_concrete_gate,
}
