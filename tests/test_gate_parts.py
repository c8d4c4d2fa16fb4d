"""The gates method's pieces, each called alone on hand-worked values (the method itself:
tests/test_gates.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.methods.base import SparseState
from sparsejax.methods.gate_settings import gate_settings, target_density
from sparsejax.methods.gates import advance_gates, gate_masks, gate_penalty, gated_weights

PARAMS = {"layer": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(2)}}


def _state(scores, lam=0.0, step=0):
    full = {"layer": {"kernel": jnp.asarray(scores, jnp.float32),
                      "bias": jnp.zeros((0,), jnp.float32)}}
    return SparseState.create(params=PARAMS, rng=jax.random.PRNGKey(0),
                              opt_state=optax.sgd(0.1).init(full), scores=full,
                              extra={"lam": jnp.float32(lam)}).replace(step=step)


def test_the_controller_raises_lam_by_the_density_error():
    # 3 of 4 gates open (test gate > 0), target density 0.5: error 0.25
    settings = gate_settings(sparsity=0.5, lam_rate=0.4, lift_rate=0.0)
    state = advance_gates(settings, _state([[0.3, 0.2], [0.1, -0.5]], lam=1.0))
    assert float(state.extra["lam"]) == pytest.approx(1.0 + 0.4 * 0.25)
    assert int(state.step) == 1


def test_the_lift_raises_every_gate_by_rate_times_deficit_while_lam_is_zero():
    # 1 of 4 open, target 0.5: deficit 0.25, lam stays at 0, every gate + 2 * 0.25
    settings = gate_settings(sparsity=0.5, lam_rate=0.4, lift_rate=2.0)
    scores = np.array([[0.3, -0.2], [-0.1, -0.5]], np.float32)
    state = advance_gates(settings, _state(scores))
    assert float(state.extra["lam"]) == 0.0
    np.testing.assert_allclose(state.scores["layer"]["kernel"], scores + 0.5, rtol=0, atol=1e-7)


def test_score_bounds_clip_after_the_lift():
    settings = gate_settings(sparsity=0.5, lift_rate=2.0, score_bounds=(-1.0, 0.6))
    state = advance_gates(settings, _state([[0.3, -0.2], [-0.1, -3.0]]))
    # clipped to [-1, 0.6] (-3 -> -1), 1 of 4 open: + 2 * 0.25, clipped again (0.8 -> 0.6)
    expected = np.array([[0.3, -0.2], [-0.1, -1.0]], np.float32) + np.float32(0.5)
    np.testing.assert_array_equal(state.scores["layer"]["kernel"],
                                  np.minimum(expected, np.float32(0.6)))


def test_exact_masks_keep_the_target_count_and_leave_the_bias_dense():
    settings = gate_settings(sparsity=0.75)
    masks = gate_masks(settings, _state([[0.3, 0.9], [0.1, -0.5]]))
    assert masks["layer"]["kernel"].tolist() == [[False, True], [False, False]]
    assert masks["layer"]["bias"].tolist() == [True, True]


def test_penalty_is_lam_times_mean_probability_open():
    settings = gate_settings(sigma=0.5, sparsity=0.5)  # Phi(0) = 0.5 for every gate
    assert float(gate_penalty(settings, _state(np.zeros((2, 2)), lam=3.0),
                              _state(np.zeros((2, 2))).scores)) == pytest.approx(1.5)


def test_gated_weights_are_weight_times_gate_and_leave_the_bias():
    # gaussian gate clip(mu + eps, 0, 1): mu = 5 opens fully whatever the noise, -5 closes
    settings = gate_settings(sigma=0.5)
    state = _state([[5.0, -5.0], [5.0, -5.0]])
    out = gated_weights(settings, state, state.scores)
    assert out["layer"]["kernel"].tolist() == [[2.0, 0.0], [2.0, 0.0]]
    assert out["layer"]["bias"].tolist() == [1.0, 1.0]
    assert target_density(settings, 0) is None  # no target: no controller
