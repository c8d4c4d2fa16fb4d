"""Straight-through masks with ``jax.custom_vjp``.

* :func:`supermask` is Edge-Popup's supermask: forward ``w * topk_mask(|scores|, density)``,
  backward ``g * w * sign(scores)`` to the scores (the straight-through estimator through
  the top-k, with the chain rule through ``abs``) and ``g * mask`` to the weights.
* :func:`ste_mask` is ``w * mask`` whose backward pass sends the dense gradient ``g`` to
  every weight, pruned or not: the growth signal of RigL and of straight-through pruning.

Both take a single array or matching pytrees.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.patterns import Pattern, as_pattern, pattern_mask
from sparsejax.topk import Scope, topk_mask
from sparsejax.validation import check_same_structure

__all__ = ["supermask", "supermask_product", "ste_mask", "pattern_masks"]


@jax.custom_vjp
def supermask_product(w: jax.Array, scores: jax.Array, mask: jax.Array) -> jax.Array:
    """The straight-through product behind :func:`supermask`, for a mask already chosen
    (so a step that knows its mask does not run the top-k twice): forward ``w * mask``,
    backward ``g * mask`` to ``w`` and ``g * w * sign(scores)`` to ``scores``.

    >>> import jax, jax.numpy as jnp
    >>> w, s, m = jnp.array([2.0, 3.0]), jnp.array([-0.5, 0.1]), jnp.array([True, False])
    >>> jax.grad(lambda s: supermask_product(w, s, m).sum())(s)
    Array([-2.,  3.], dtype=float32)
    """
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _supermask_fwd(w, scores, mask):
    return supermask_product(w, scores, mask), (w, scores, mask)


def _supermask_bwd(residuals, g):
    w, scores, mask = residuals
    grad_w = jnp.where(mask, g, jnp.zeros((), g.dtype))
    grad_scores = (g * w * jnp.sign(scores)).astype(scores.dtype)
    return grad_w, grad_scores, None


supermask_product.defvjp(_supermask_fwd, _supermask_bwd)


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
      pattern: the sparsity pattern of the mask (:mod:`sparsejax.patterns`):
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
    """
    check_same_structure(w, scores, reference_name="weights", other_name="scores")
    fixed = jax.tree_util.tree_map(lax.stop_gradient, scores)
    if as_pattern(pattern).kind == "unstructured":
        masks = topk_mask(fixed, density, scope=scope, check_finite_scores=check_finite_scores,
                          by_magnitude=True)
    else:
        masks = pattern_masks(fixed, pattern, density, scope=scope,
                              check_finite_scores=check_finite_scores)
    return jax.tree_util.tree_map(supermask_product, w, scores, masks)


def pattern_masks(scores: Any, pattern: str | Pattern, density: Any, *,
                  scope: Scope = "layer", check_finite_scores: bool = True) -> Any:
    """The masks of the straight-through top-k with a pattern: per leaf of ``scores``,
    :func:`sparsejax.patterns.pattern_mask` of ``|scores|`` (``density`` one number, or a
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


@jax.custom_vjp
def _ste_product(w: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _ste_fwd(w, mask):
    return _ste_product(w, mask), None


def _ste_bwd(_, g):
    return g, None


_ste_product.defvjp(_ste_fwd, _ste_bwd)


def ste_mask(w: Any, mask: Any) -> Any:
    """``w * mask`` whose gradient is the dense gradient ``g`` for every weight.

    >>> import jax, jax.numpy as jnp
    >>> w, m = jnp.array([1.0, 2.0]), jnp.array([True, False])
    >>> ste_mask(w, m)
    Array([1., 0.], dtype=float32)
    >>> jax.grad(lambda w: (ste_mask(w, m) * jnp.array([3.0, 5.0])).sum())(w)
    Array([3., 5.], dtype=float32)
    """
    check_same_structure(w, mask)
    return jax.tree_util.tree_map(_ste_product, w, mask)
