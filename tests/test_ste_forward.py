"""The straight-through masks as ``custom_jvp`` rules (issue #28 item 5).

Reverse mode must be bit for bit what the former ``custom_vjp`` definitions gave (kept
below as the reference); forward mode (``jvp``, ``linearize``, ``jacfwd``, ``hessian``,
forward-over-reverse) must give the straight-through derivative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.core.ste import _ste_product, ste_mask, supermask, supermask_product
from sparsejax.core.topk import topk_mask

# --- the former custom_vjp definitions, verbatim: the reverse-mode reference ------------


@jax.custom_vjp
def old_supermask_product(w, scores, mask):
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _old_supermask_fwd(w, scores, mask):
    return old_supermask_product(w, scores, mask), (w, scores, mask)


def _old_supermask_bwd(residuals, g):
    w, scores, mask = residuals
    grad_w = jnp.where(mask, g, jnp.zeros((), g.dtype))
    grad_scores = (g * w * jnp.sign(scores)).astype(scores.dtype)
    return grad_w, grad_scores, None


old_supermask_product.defvjp(_old_supermask_fwd, _old_supermask_bwd)


@jax.custom_vjp
def old_ste_product(w, mask):
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _old_ste_fwd(w, mask):
    return old_ste_product(w, mask), None


def _old_ste_bwd(_, g):
    return g, None


old_ste_product.defvjp(_old_ste_fwd, _old_ste_bwd)


# --- fixed inputs ---------------------------------------------------------------------

def _inputs(w_dtype, s_dtype, n=64):
    """Weights, scores with zeros (sign 0), a -0.0 and ties, the mask |scores| >= 0.5, a
    cotangent; one huge weight so that ``g * w`` overflows where the score is 0
    (``inf * 0``: the order of the products shows)."""
    k = jax.random.split(jax.random.PRNGKey(7), 3)
    w = jax.random.normal(k[0], (n,), jnp.float32)
    w = w.astype(w_dtype).at[5].set(jnp.finfo(w_dtype).max / 2)
    s = jnp.round(jax.random.normal(k[1], (n,), jnp.float32) * 4) / 4  # many ties
    s = s.at[:4].set(0.0).at[4].set(-0.0).at[5].set(0.0)
    s = s.at[6:12].set(jnp.array([0.5, -0.5, 0.5, -0.5, 0.5, 0.5]))
    s = s.astype(s_dtype)
    mask = jnp.abs(s) >= 0.5  # ties kept alike (top-k's tie ranking: the tree test)
    g = (jax.random.normal(k[2], (n,), jnp.float32) * 3).astype(w_dtype)
    g = g.at[5].set(10.0)
    return w, s, mask, g


DTYPES = [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
          (jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16),
          (jnp.float16, jnp.float32)]


def _eq(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)).view(np.uint32),
                                      np.asarray(y.astype(jnp.float32)).view(np.uint32))


# --- reverse mode: bit for bit the former custom_vjp ------------------------------------

@pytest.mark.parametrize("w_dtype,s_dtype,jit", [(*d, False) for d in DTYPES]
                         + [(*d, True) for d in DTYPES[:2]])
def test_supermask_product_vjp_is_bitwise_the_former_custom_vjp(w_dtype, s_dtype, jit):
    w, s, mask, g = _inputs(w_dtype, s_dtype)
    wrap = jax.jit if jit else (lambda f: f)

    def pullback(product):
        return wrap(lambda w, s, g: jax.vjp(lambda w, s: product(w, s, mask), w, s)[1](g))

    _eq(pullback(supermask_product)(w, s, g), pullback(old_supermask_product)(w, s, g))

    # one argument at a time (the other a symbolic zero: Edge-Popup's frozen weights)
    def weights_only(product):
        return wrap(lambda w, g: jax.vjp(lambda w: product(w, s, mask), w)[1](g))

    def scores_only(product):
        return wrap(lambda s, g: jax.vjp(lambda s: product(w, s, mask), s)[1](g))

    _eq(weights_only(supermask_product)(w, g), weights_only(old_supermask_product)(w, g))
    _eq(scores_only(supermask_product)(s, g), scores_only(old_supermask_product)(s, g))

    def grad(product, argnums):
        return wrap(jax.grad(lambda w, s: jnp.sum(jnp.tanh(
            product(w, s, mask).astype(jnp.float32)) * 1.5), argnums=argnums))

    for argnums in (0, 1):
        _eq(grad(supermask_product, argnums)(w, s), grad(old_supermask_product, argnums)(w, s))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ste_mask_vjp_is_bitwise_the_former_custom_vjp(dtype):
    w, _, mask, g = _inputs(dtype, jnp.float32)
    new = jax.vjp(lambda w: _ste_product(w, mask), w)[1](g)
    old = jax.vjp(lambda w: old_ste_product(w, mask), w)[1](g)
    _eq(new, old)
    a = jnp.linspace(-2, 2, w.shape[0]).astype(dtype)
    loss = lambda p: lambda w: jnp.sum((p(w, mask) * a) ** 2 + jnp.sin(p(w, mask)))  # noqa: E731
    _eq(jax.jit(jax.grad(loss(_ste_product)))(w), jax.jit(jax.grad(loss(old_ste_product)))(w))


def test_supermask_tree_and_edge_popup_loss_are_bitwise_the_former_custom_vjp():
    """A loss of two leaves through ``supermask`` (scores with ties: the top-k ranks them by
    position), gradients to the scores and to the weights, against the same loss built on
    the former product with the same masks."""
    k = jax.random.split(jax.random.PRNGKey(3), 5)
    params = {"a": jax.random.normal(k[0], (16, 8)), "b": jax.random.normal(k[1], (8, 4))}
    scores = {"a": jnp.round(jax.random.uniform(k[2], (16, 8), minval=-1) * 8) / 8,
              "b": jnp.round(jax.random.uniform(k[3], (8, 4), minval=-1) * 8) / 8}
    x = jax.random.normal(k[4], (16, 8))

    def net(ws):
        return jnp.sum(jnp.tanh(ws["a"]) * x) + jnp.sum(ws["b"] ** 3)

    masks = topk_mask(scores, 0.4, by_magnitude=True)
    _eq(supermask(params, scores, 0.4),
        jax.tree_util.tree_map(supermask_product, params, scores, masks))

    def loss(product):
        return lambda p, s: net(jax.tree_util.tree_map(product, p, s, masks))

    for argnums in (1, (0, 1)):  # scores alone (Edge-Popup), both (supermask_weights)
        _eq(jax.grad(loss(supermask_product), argnums)(params, scores),
            jax.grad(loss(old_supermask_product), argnums)(params, scores))
    # supermask's own gradient (its top-k inside the differentiated function)
    _eq(jax.grad(lambda s: net(supermask(params, s, 0.4)))(scores),
        jax.grad(loss(old_supermask_product), 1)(params, scores))


# --- forward mode: the straight-through derivative ------------------------------------

W = jnp.array([1.5, -2.0, 0.5, 3.0, -1.0])
S = jnp.array([0.3, -0.7, 0.0, -0.2, 0.9])
M = jnp.array([True, True, False, False, True])
A = jnp.array([2.0, -1.0, 3.0, 0.5, 1.0])
SIGN = np.array([1.0, -1.0, 0.0, -1.0, 1.0])
MF = np.array([1.0, 1.0, 0.0, 0.0, 1.0])


def test_jvp_and_linearize_give_the_straight_through_tangent():
    tw = jnp.array([0.1, 0.2, 0.3, 0.4, 0.5])
    ts = jnp.array([1.0, -2.0, 3.0, 4.0, -0.5])
    out, t = jax.jvp(lambda w: ste_mask(w, M), (W,), (tw,))
    np.testing.assert_array_equal(out, np.where(MF, W, 0))
    np.testing.assert_array_equal(t, tw)  # the identity: pruned weights too

    expected = np.where(MF, tw, 0) + np.asarray(W) * SIGN * np.asarray(ts)
    out, t = jax.jvp(lambda w, s: supermask_product(w, s, M), (W, S), (tw, ts))
    np.testing.assert_array_equal(out, np.where(MF, W, 0))
    np.testing.assert_allclose(t, expected, rtol=1e-6)
    out, f_jvp = jax.linearize(lambda w, s: supermask_product(w, s, M), W, S)
    np.testing.assert_allclose(f_jvp(tw, ts), expected, rtol=1e-6)
    _, t = jax.jvp(lambda s: supermask(W, s, 0.6), (S,), (ts,))
    # supermask's own mask: the top 3 of |S| are entries 1, 4, 0 (the tangent ignores it)
    np.testing.assert_allclose(t, np.asarray(W) * SIGN * np.asarray(ts), rtol=1e-6)
    _, t = jax.jvp(lambda w: supermask(w, S, 0.6), (W,), (tw,))
    np.testing.assert_array_equal(t, np.where([1, 1, 0, 0, 1], tw, 0))


def test_jvp_under_jit_and_vmap():
    tw = jnp.arange(5.0)
    ts = jnp.linspace(-1, 1, 5)
    f = lambda w, s: supermask_product(w, s, M)  # noqa: E731
    eager = jax.jvp(f, (W, S), (tw, ts))
    _eq(jax.jit(lambda *a: jax.jvp(f, a[:2], a[2:]))(W, S, tw, ts), eager)
    # a batch of tangents
    tws, tss = jnp.stack([tw, 2 * tw, -tw]), jnp.stack([ts, ts, 0 * ts])
    batched = jax.jit(jax.vmap(lambda a, b: jax.jvp(f, (W, S), (a, b))[1]))(tws, tss)
    for i in range(3):
        np.testing.assert_allclose(batched[i], jax.jvp(f, (W, S), (tws[i], tss[i]))[1],
                                   rtol=1e-6)
    # a batch of primals and masks
    masks = jnp.stack([M, ~M])
    t = jax.vmap(lambda m: jax.jvp(lambda w: ste_mask(w, m), (W,), (tw,))[1])(masks)
    np.testing.assert_array_equal(t, jnp.stack([tw, tw]))
    t = jax.vmap(lambda m: jax.jvp(lambda s: supermask_product(W, s, m), (S,), (ts,))[1])(masks)
    np.testing.assert_allclose(t, np.stack([np.asarray(W) * SIGN * np.asarray(ts)] * 2),
                               rtol=1e-6)
    _, f_jvp = jax.linearize(jax.jit(f), W, S)
    np.testing.assert_allclose(f_jvp(tw, ts), eager[1], rtol=1e-6)


def test_jacfwd_equals_jacrev_and_the_hand_worked_jacobian():
    for f, x, expected in [
        (lambda w: ste_mask(w, M), W, np.eye(5)),
        (lambda s: supermask_product(W, s, M), S, np.diag(np.asarray(W) * SIGN)),
        (lambda w: supermask_product(w, S, M), W, np.diag(MF)),
    ]:
        fwd, rev = jax.jacfwd(f)(x), jax.jacrev(f)(x)
        np.testing.assert_array_equal(fwd, rev)
        np.testing.assert_array_equal(fwd, expected)


def test_hessians_are_the_straight_through_ones():
    """L = sum((P * A) ** 2) with P the masked product (the primal is masked):
    * ste_mask: dL/dw = 2 A^2 P (masked), and its straight-through derivative in w is
      2 diag(A^2): pruned weights included.
    * supermask_product in the scores: dL/ds = 2 A^2 P W sign(S), derivative
      2 diag(A^2 W^2 sign(S)^2) (sign has derivative 0); in the weights: dL/dw =
      2 A^2 P M, derivative 2 diag(A^2 M).
    """
    a2 = np.asarray(A) ** 2
    w2 = np.asarray(W) ** 2
    ste_loss = lambda w: jnp.sum((ste_mask(w, M) * A) ** 2)  # noqa: E731
    sm_loss = lambda w, s: jnp.sum((supermask_product(w, s, M) * A) ** 2)  # noqa: E731
    loss = lambda s: jnp.sum((supermask(W, s, 0.6) * A) ** 2)  # noqa: E731

    @jax.jit  # one program for all of them
    def derivatives(w, s):
        return {"ste_grad": jax.grad(ste_loss)(w), "ste_hess": jax.hessian(ste_loss)(w),
                "ste_revrev": jax.jacrev(jax.jacrev(ste_loss))(w),
                "sm_hess": jax.hessian(sm_loss, (0, 1))(w, s),
                "sm_revrev": jax.jacrev(jax.jacrev(sm_loss, (0, 1)), (0, 1))(w, s),
                "supermask_hess": jax.hessian(loss)(s)}

    d = derivatives(W, S)
    np.testing.assert_array_equal(d["ste_grad"], 2 * a2 * np.where(MF, W, 0))
    np.testing.assert_array_equal(d["ste_hess"], np.diag(2 * a2))
    np.testing.assert_array_equal(d["ste_revrev"], np.diag(2 * a2))

    full = d["sm_hess"]
    np.testing.assert_allclose(full[1][1], np.diag(2 * a2 * w2 * SIGN ** 2), rtol=1e-6)
    np.testing.assert_allclose(full[0][0], np.diag(2 * a2 * MF), rtol=1e-6)
    # The mixed blocks differ: a straight-through gradient is no gradient field, so its
    # Jacobian need not be symmetric. d/ds_j of dL/dw = 2 A^2 P M is 2 A^2 M W sign(S)
    # (dP/ds = W sign(S)); d/dw_j of dL/ds = 2 A^2 P W sign(S) is 2 A^2 sign(S) (M W + P)
    # = 4 A^2 M W sign(S). Reverse over reverse gives the same blocks.
    ws = np.asarray(W) * SIGN * MF
    np.testing.assert_allclose(full[0][1], np.diag(2 * a2 * ws), rtol=1e-6)
    np.testing.assert_allclose(full[1][0], np.diag(4 * a2 * ws), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(d["sm_revrev"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)  # equal values; the signs of zeros may differ

    # supermask itself: the mask is chosen from stop_gradient(scores), the same Hessian
    np.testing.assert_allclose(d["supermask_hess"], np.diag(2 * a2 * w2 * SIGN ** 2), rtol=1e-6)
    # and outside jit
    np.testing.assert_array_equal(jax.hessian(ste_loss)(W), np.diag(2 * a2))


def test_forward_over_reverse_hessian_vector_product():
    v = jnp.array([1.0, -1.0, 2.0, 0.5, 3.0])
    loss = lambda s: jnp.sum((supermask_product(W, s, M) * A) ** 2)  # noqa: E731
    hvp = jax.jit(lambda s, v: jax.jvp(jax.grad(loss), (s,), (v,))[1])(S, v)
    np.testing.assert_allclose(hvp, jax.hessian(loss)(S) @ v, rtol=1e-6)
    ste_loss = lambda w: jnp.sum((ste_mask(w, M) * A) ** 2)  # noqa: E731
    hvp = jax.jvp(jax.grad(ste_loss), (W,), (v,))[1]
    np.testing.assert_array_equal(hvp, 2 * np.asarray(A) ** 2 * np.asarray(v))


# --- symbolic zeros: nothing computed for an input not differentiated -------------------

def _jvp_primitives(f, x):
    """The top-level primitives of ``jax.jvp(f, (x,), (t,))``: the primal product is one
    ``custom_jvp_call``; what else is there is the tangent rule's work."""
    jaxpr = jax.make_jaxpr(lambda x, t: jax.jvp(f, (x,), (t,)))(x, x)
    return [e.primitive.name for e in jaxpr.eqns]


def test_frozen_inputs_stay_symbolic_zeros():
    # scores only (Edge-Popup's frozen weights): no zeros, no where, no sum for the weights
    # (with dense zero tangents: two broadcast_in_dim, a where ("jit") and an add)
    assert _jvp_primitives(lambda s: supermask_product(W, s, M), S) == [
        "custom_jvp_call", "sign", "mul", "mul"]
    # weights only (frozen scores): the where, no sign or product for the scores
    assert _jvp_primitives(lambda w: supermask_product(w, S, M), W) == ["custom_jvp_call", "jit"]
    # ste_mask's tangent is the identity: nothing at all
    assert _jvp_primitives(lambda w: ste_mask(w, M), W) == ["custom_jvp_call"]
    # and the reverse pass of a scores-only gradient computes nothing for the weights
    grad = jax.make_jaxpr(jax.grad(lambda s: jnp.sum(supermask_product(W, s, M))))(S)
    names = [e.primitive.name for e in grad.eqns]
    assert "jit" not in names and "add" not in names and names.count("custom_jvp_call") == 1
