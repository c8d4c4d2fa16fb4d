import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import cosine_drop_fraction, cubic_sparsity, is_update_step, one_shot


def test_cubic_matches_zhu_gupta_formula():
    s = cubic_sparsity(0.9, begin_step=100, end_step=1100, initial_sparsity=0.1, frequency=100)
    for t in range(0, 1500, 37):
        t_last = min(max(t, 100), 1100)
        t_last = 100 + ((t_last - 100) // 100) * 100
        expected = 0.9 + (0.1 - 0.9) * (1 - (t_last - 100) / 1000) ** 3
        assert np.isclose(float(s(t)), expected, atol=1e-6), t
    assert np.isclose(float(jax.jit(s)(jnp.int32(600))), 0.9 - 0.8 * 0.125, atol=1e-6)


def test_cosine_drop_fraction_formula():
    f = cosine_drop_fraction(0.3, end_step=750)
    for t in (0, 1, 100, 374, 749):
        assert np.isclose(float(f(t)), 0.15 * (1 + np.cos(np.pi * t / 750)), atol=1e-6)
    assert float(f(750)) == 0.0 and float(f(10_000)) == 0.0


def test_one_shot_and_update_steps():
    s = one_shot(0.8, at_step=5)
    assert float(s(4)) == 0.0 and np.isclose(float(s(5)), 0.8)
    steps = [t for t in range(0, 1000) if bool(is_update_step(t, 100, end_step=750))]
    assert steps == [100, 200, 300, 400, 500, 600, 700]


def test_schedule_errors():
    with pytest.raises(ValueError, match="sparsity"):
        cubic_sparsity(1.0, 0, 10)
    with pytest.raises(ValueError, match="end_step"):
        cubic_sparsity(0.5, 10, 10)
    with pytest.raises(ValueError, match="interval"):
        is_update_step(3, 0)
