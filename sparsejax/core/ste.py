"""Straight-through masks as ``jax.custom_jvp`` rules.

* :func:`supermask` is Edge-Popup's supermask: forward ``w * topk_mask(|scores|, density)``,
  backward ``g * w * sign(scores)`` to the scores (the straight-through estimator through
  the top-k, with the chain rule through ``abs``) and ``g * mask`` to the weights.
* :func:`ste_mask` is ``w * mask`` whose backward pass sends the dense gradient ``g`` to
  every weight, pruned or not: the growth signal of RigL and of straight-through pruning.

Both take a single array or matching pytrees.

The straight-through derivatives are linear in the tangents (``dw`` for :func:`ste_mask`;
``mask * dw + w * sign(scores) * dscores`` for :func:`supermask_product`), so they are
written as ``jax.custom_jvp`` rules: reverse mode transposes them into the backward pass
above (bit for bit the former ``jax.custom_vjp`` backward, ``tests/test_ste_forward.py``),
and forward mode works too: ``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``,
``jax.hessian`` and forward-over-reverse Hessian-vector products all see the
straight-through derivative (a ``custom_vjp`` function has no forward mode at all).
Undifferentiated inputs stay symbolic zeros: frozen weights cost nothing in the rule.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from sparsejax.core.patterns import Pattern, as_pattern, pattern_mask
from sparsejax.core.topk import Scope, topk_mask
from sparsejax.core.validation import check_same_structure

__all__ = ["supermask", "supermask_product", "ste_mask", "pattern_masks"]


@jax.custom_jvp
def supermask_product(w: jax.Array, scores: jax.Array, mask: jax.Array) -> jax.Array:
    """The straight-through product behind :func:`supermask`, for a mask already chosen
    (so a step that knows its mask does not run the top-k twice): forward ``w * mask``,
    backward ``g * mask`` to ``w`` and ``g * w * sign(scores)`` to ``scores``.

    A ``jax.custom_jvp`` whose tangent is linear: ``mask * dw + w * sign(scores) * dscores``;
    reverse mode transposes it into the backward pass above, and forward mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) gives the same straight-through
    derivative.

    >>> import jax, jax.numpy as jnp
    >>> w, s, m = jnp.array([2.0, 3.0]), jnp.array([-0.5, 0.1]), jnp.array([True, False])
    >>> jax.grad(lambda s: supermask_product(w, s, m).sum())(s)
    Array([-2.,  3.], dtype=float32)
    >>> jax.jvp(lambda s: supermask_product(w, s, m), (s,), (jnp.ones(2),))
    (Array([2., 0.], dtype=float32), Array([-2.,  3.], dtype=float32))
    """
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _is_zero(tangent: Any) -> bool:
    return type(tangent) is SymbolicZero


def _supermask_jvp(primals, tangents):
    # Linear in (dw, dscores), so JAX transposes it for the reverse pass. The operations
    # are those of the former custom_vjp backward in reverse order, so the transpose is
    # that backward bit for bit: g -> g * w (in w's dtype) -> the promoted dtype
    # -> * sign(scores) -> scores' dtype. A tangent not differentiated stays symbolic
    # (nothing is computed for frozen weights or frozen scores); the bool mask has none.
    w, scores, mask = primals
    dw, dscores, _ = tangents
    out = supermask_product(w, scores, mask)
    parts = []
    if not _is_zero(dw):
        parts.append(jnp.where(mask, dw, jnp.zeros((), dw.dtype)))
    if not _is_zero(dscores):
        promoted = jnp.result_type(w.dtype, scores.dtype)
        sign = jnp.sign(scores).astype(promoted)
        parts.append((dscores.astype(promoted) * sign).astype(w.dtype) * w)
    if not parts:
        return out, SymbolicZero(jax.typeof(out).to_tangent_aval())
    return out, parts[0] if len(parts) == 1 else parts[0] + parts[1]


supermask_product.defjvp(_supermask_jvp, symbolic_zeros=True)


def supermask(
    w: Any,
    scores: Any,
    density: Any,
    *,
    scope: Scope = "layer",
    check_finite_scores: bool = True,
    pattern: str | Pattern = "unstructured",
) -> Any:
    """Edge-Popup's supermask: keep the weights whose ``|score|`` is in the top ``density``.

    Forward: ``w * topk_mask(|scores|, density)``. Backward: the scores receive
    ``g * w * sign(scores)`` (straight through the top-k; the sign comes from ranking
    ``|scores|``, and without it negative scores would learn backwards); the weights
    receive ``g * mask``.

    Args:
      w: weights (an array or pytree).
      scores: real-valued scores with the structure and shapes of ``w``.
      density: fraction kept; one number or, with ``scope='layer'``, a tree of numbers.
      scope: ``'layer'`` (per leaf top-k, the paper's default) or ``'global'``.
      check_finite_scores: see :func:`sparsejax.topk_mask`.
      pattern: the sparsity pattern of the mask (:mod:`sparsejax.core.patterns`):
        ``'unstructured'`` (default, the top-k above), ``'N:M'`` (the top ``N`` of
        ``|scores|`` in every group of ``M``; ``density`` may be ``None`` or must be
        ``N / M``), ``'block:B'`` or ``'channel'``; per leaf (``scope='layer'``) only. The
        backward pass is the same straight-through estimate.

    >>> import jax, jax.numpy as jnp
    >>> w = jnp.array([1.0, 2.0, 3.0, 4.0])
    >>> s = jnp.array([0.1, -0.9, 0.5, 0.2])
    >>> supermask(w, s, 0.5)
    Array([0., 2., 3., 0.], dtype=float32)
    >>> jax.grad(lambda s: supermask(w, s, 0.5).sum())(s)
    Array([ 1., -2.,  3.,  4.], dtype=float32)

    Forward mode gives the same straight-through derivative (``w * sign(scores)`` per
    score tangent):

    >>> jax.jvp(lambda s: supermask(w, s, 0.5), (s,), (jnp.ones(4),))[1]
    Array([ 1., -2.,  3.,  4.], dtype=float32)
    """
    check_same_structure(w, scores, reference_name="weights", other_name="scores")
    fixed = jax.tree_util.tree_map(lax.stop_gradient, scores)
    if as_pattern(pattern).ranks_globally:  # one top-k of single weights for the tree
        masks = topk_mask(fixed, density, scope=scope, check_finite_scores=check_finite_scores,
                          by_magnitude=True)
    else:
        masks = pattern_masks(fixed, pattern, density, scope=scope,
                              check_finite_scores=check_finite_scores)
    return jax.tree_util.tree_map(supermask_product, w, scores, masks)


def pattern_masks(scores: Any, pattern: str | Pattern, density: Any, *,
                  scope: Scope = "layer", check_finite_scores: bool = True) -> Any:
    """The masks of the straight-through top-k with a pattern: per leaf of ``scores``,
    :func:`sparsejax.core.patterns.pattern_mask` of ``|scores|`` (``density`` one number, or a
    tree of them with the scores' structure; ``None`` for an N:M pattern).

    >>> import jax.numpy as jnp
    >>> pattern_masks({"w": jnp.array([[0.1], [-0.9], [0.5], [0.2]])}, "2:4", None)["w"].ravel()
    Array([False,  True,  True, False], dtype=bool)
    """
    pattern = as_pattern(pattern)
    if scope != "layer":
        raise ValueError(f"pattern {pattern} chooses a mask per leaf; it needs "
                         f"scope='layer', got scope={scope!r}")
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    if density is None or jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(density)):
        densities = [density] * len(leaves)
    else:
        check_same_structure(scores, density, reference_name="scores",
                             other_name="densities", check_shapes=False)
        densities = jax.tree_util.tree_leaves(density)
    masks = [pattern_mask(leaf, pattern, d, by_magnitude=True,
                          check_finite_scores=check_finite_scores)
             for leaf, d in zip(leaves, densities, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, masks)


@jax.custom_jvp
def _ste_product(w: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _ste_jvp(primals, tangents):
    # The straight-through derivative is the identity: linear, and its transpose sends
    # the dense gradient g to every weight (the former custom_vjp backward).
    w, mask = primals
    return _ste_product(w, mask), tangents[0]


_ste_product.defjvp(_ste_jvp, symbolic_zeros=True)


def ste_mask(w: Any, mask: Any) -> Any:
    """``w * mask`` whose gradient is the dense gradient ``g`` for every weight.

    Its derivative is straight through in every mode: the identity for ``jax.jvp`` and
    ``jax.jacfwd``, so ``jax.hessian`` of ``sum(ste_mask(w, m) ** 2)`` is ``2 * I``,
    pruned weights included, while its gradient ``2 * ste_mask(w, m)`` is masked.

    >>> import jax, jax.numpy as jnp
    >>> w, m = jnp.array([1.0, 2.0]), jnp.array([True, False])
    >>> ste_mask(w, m)
    Array([1., 0.], dtype=float32)
    >>> jax.grad(lambda w: (ste_mask(w, m) * jnp.array([3.0, 5.0])).sum())(w)
    Array([3., 5.], dtype=float32)
    >>> jax.hessian(lambda w: (ste_mask(w, m) ** 2).sum())(w)
    Array([[2., 0.],
           [0., 2.]], dtype=float32)
    """
    check_same_structure(w, mask)
    return jax.tree_util.tree_map(_ste_product, w, mask)
