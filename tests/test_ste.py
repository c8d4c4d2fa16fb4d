import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import ste_mask, supermask, topk_mask


def _loss(effective_w, x):
    return jnp.sum(jnp.sin(x @ effective_w))


def _inputs():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(k1, (6, 5))
    scores = jax.random.normal(k2, (6, 5))  # about half negative
    x = jax.random.normal(k3, (4, 6))
    return w, scores, x


def test_supermask_forward_is_w_times_topk_of_abs_scores():
    w, scores, _ = _inputs()
    expected = w * topk_mask(jnp.abs(scores), 0.4)
    np.testing.assert_array_equal(np.asarray(supermask(w, scores, 0.4)), np.asarray(expected))


def test_supermask_gradients_match_hand_written_straight_through():
    w, scores, x = _inputs()

    def hand_written(w, s):
        mask = lax.stop_gradient(topk_mask(jnp.abs(s), 0.4).astype(w.dtype))
        # forward w * mask; d/ds passes straight through the top-k, then through |s|
        return w * (mask + jnp.abs(s) - lax.stop_gradient(jnp.abs(s)))

    ours = jax.jit(jax.grad(lambda w, s: _loss(supermask(w, s, 0.4), x), argnums=(0, 1)))
    ref = jax.grad(lambda w, s: _loss(hand_written(w, s), x), argnums=(0, 1))
    for got, want in zip(ours(w, scores), ref(w, scores), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_supermask_score_gradient_follows_the_sign_rule():
    w, scores, x = _inputs()
    g = jax.grad(lambda we: _loss(we, x))(supermask(w, scores, 0.4))
    grad_scores = jax.grad(lambda s: _loss(supermask(w, s, 0.4), x))(scores)
    np.testing.assert_allclose(np.asarray(grad_scores), np.asarray(g * w * jnp.sign(scores)),
                               rtol=1e-6)
    # A negative score receives the opposite gradient of the positive score with the
    # same magnitude: without the sign, negative scores would learn backwards.
    flipped = jax.grad(lambda s: _loss(supermask(w, s, 0.4), x))(-scores)
    np.testing.assert_allclose(np.asarray(flipped), -np.asarray(grad_scores), rtol=1e-6)


def test_supermask_global_scope_and_pytrees():
    w = {"a": jnp.ones((3, 3)), "b": jnp.ones((2, 2))}
    s = {"a": jnp.arange(9.0).reshape(3, 3), "b": jnp.full((2, 2), 100.0)}
    out = supermask(w, s, 0.5, scope="global")  # keep floor(6.5 + 0.5) = 7 of 13
    assert int((out["b"] != 0).sum()) == 4 and int((out["a"] != 0).sum()) == 3


def test_ste_mask_forward_masks_and_backward_is_dense():
    w, _, x = _inputs()
    mask = topk_mask(jnp.abs(w), 0.3)
    out = ste_mask(w, mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.where(mask, w, 0.0)))
    got = jax.jit(jax.grad(lambda w: _loss(ste_mask(w, mask), x)))(w)
    # the dense gradient: d loss / d w_eff evaluated at the masked weights, for all w
    want = jax.grad(lambda we: _loss(we, x))(jnp.where(mask, w, 0.0))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[~np.asarray(mask)] != 0)  # pruned weights get gradient
