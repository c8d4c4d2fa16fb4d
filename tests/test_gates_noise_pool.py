"""The gates' noise pool (``gates(..., noise='pool')``): each step's noise is a window of
draws made once at init, read at a random offset; fresh noise stays the default."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.methods.base import step_key
from sparsejax.methods.gates import gates

PARAMS = {"fc1": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)},
          "head": {"kernel": -jnp.ones((5, 3)), "bias": jnp.zeros(3)}}
GATED = 6 * 5 + 5 * 3


def pool_method(**options):
    return gates(optax.adam(0.05), sparsity=0.5, total_steps=50, sigma_final=0.05,
                 noise="pool", **options)


def test_the_pool_holds_two_draws_per_gate_of_the_gate_noise():
    state = pool_method().init(PARAMS, jax.random.key(0))
    pool = np.asarray(state.extra["noise_pool"])
    assert pool.shape == (2 * GATED,)
    assert len(np.unique(pool)) == pool.size  # distinct draws
    big = gates(optax.adam(0.05), sigma=0.5, noise="pool").init(
        {"w": {"kernel": jnp.ones((300, 200))}}, jax.random.key(1))
    draws = np.asarray(big.extra["noise_pool"])
    assert abs(draws.mean()) < 0.005 and abs(draws.std() - 0.5) < 0.005  # N(0, sigma^2)


def test_each_step_reads_the_window_at_its_offset_cut_into_the_leaves():
    method = pool_method()
    state = method.init(PARAMS, jax.random.key(0)).replace(step=jnp.int32(7))
    offset = int(jax.random.randint(step_key(state, 0x7A), (), 0, GATED + 1))
    window = np.asarray(state.extra["noise_pool"])[offset:offset + GATED]
    mu = {"fc1": {"kernel": jnp.full((6, 5), 0.4), "bias": jnp.zeros((0,))},
          "head": {"kernel": jnp.full((5, 3), 0.4), "bias": jnp.zeros((0,))}}
    params = method.materialize(state, mu)
    noise_fc1 = window[:30].reshape(6, 5)
    noise_head = window[30:].reshape(5, 3)
    # z = clip(mu + factor * eps, 0, 1) times the frozen weight; biases untouched
    factor = float(np.asarray(
        1.0 + (0.05 / 0.5 - 1.0) * 0.5 * (1.0 - np.cos(np.pi * 7 / 50))))
    weight_fc1 = np.asarray(state.params["fc1"]["kernel"])
    weight_head = np.asarray(state.params["head"]["kernel"])
    np.testing.assert_allclose(params["fc1"]["kernel"],
                               np.clip(0.4 + factor * noise_fc1, 0, 1) * weight_fc1, rtol=1e-6)
    np.testing.assert_allclose(params["head"]["kernel"],
                               np.clip(0.4 + factor * noise_head, 0, 1) * weight_head,
                               rtol=1e-6)
    np.testing.assert_array_equal(params["fc1"]["bias"], state.params["fc1"]["bias"])


def test_steps_get_different_windows_and_the_pool_never_changes():
    # no anneal and a fixed mu, and the weights are frozen: between steps only the window
    # the step reads can change what materialize returns
    method = gates(optax.adam(0.05), sparsity=0.5, total_steps=50, noise="pool")
    state = method.init(PARAMS, jax.random.key(0))
    pool = np.asarray(state.extra["noise_pool"])
    weights = jax.tree.map(np.asarray, state.params)
    mu = {"fc1": {"kernel": jnp.full((6, 5), 0.5), "bias": jnp.zeros((0,))},
          "head": {"kernel": jnp.full((5, 3), 0.5), "bias": jnp.zeros((0,))}}
    grads = jax.tree.map(jnp.ones_like, state.scores)
    update = jax.jit(method.update)
    seen = []
    for _ in range(5):
        seen.append(np.asarray(method.materialize(state, mu)["fc1"]["kernel"]))
        state = update(state, grads)
        np.testing.assert_array_equal(state.extra["noise_pool"], pool)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(weights), strict=True):
            np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in seen}) == 5
    # a second init from the same key (another process, a resume) draws the same pool,
    # so the same step reads the same noise
    twin = method.init(PARAMS, jax.random.key(0)).replace(step=state.step)
    np.testing.assert_array_equal(twin.extra["noise_pool"], pool)
    np.testing.assert_array_equal(method.materialize(twin, state.scores)["fc1"]["kernel"],
                                  method.materialize(state, state.scores)["fc1"]["kernel"])


def test_fresh_noise_is_the_default_and_keeps_no_pool():
    state = gates(optax.adam(0.05), sparsity=0.5).init(PARAMS, jax.random.key(0))
    assert "noise_pool" not in state.extra


def test_an_unknown_noise_is_a_clear_error():
    with pytest.raises(ValueError, match="noise must be 'fresh'"):
        gates(optax.adam(0.05), noise="cached")
