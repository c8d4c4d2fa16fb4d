"""The score functions of pruning (:mod:`sparsejax.methods.pruning`): pure functions that
return a pytree of scores shaped like the params, larger meaning keep.

>>> import jax.numpy as jnp
>>> magnitude_scores({"w": jnp.array([-2.0, 1.0])})["w"]
Array([2., 1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.core._tree import leaf_paths
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.transforms import zero_masked

__all__ = [
    "ApplyFn",
    "magnitude_scores",
    "exclude_pruned",
    "snip_scores",
    "grasp_scores",
    "synflow_scores",
]

PyTree = Any
ApplyFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]
"""``apply_fn(params, model_state, inputs) -> outputs`` in evaluation mode (batch norm on
its running statistics). The harness passes it to builders that take ``apply_fn``."""


# --------------------------------------------------------------------------- scores


def magnitude_scores(params: PyTree) -> PyTree:
    """``|w|`` for every leaf.

    >>> import jax.numpy as jnp
    >>> magnitude_scores({"w": jnp.array([-2.0, 1.0])})["w"]
    Array([2., 1.], dtype=float32)
    """
    return jax.tree_util.tree_map(lambda w: jnp.abs(w).astype(jnp.float32), params)


def exclude_pruned(scores: PyTree, masks: PyTree) -> PyTree:
    """Scores with pruned entries set to ``-1``, below every non-negative score, so a new
    selection never revives them.

    >>> import jax.numpy as jnp
    >>> exclude_pruned({"w": jnp.array([0.5, 0.7])}, {"w": jnp.array([True, False])})["w"]
    Array([ 0.5, -1. ], dtype=float32)
    """
    return jax.tree_util.tree_map(
        lambda s, m: jnp.where(m, s, jnp.float32(-1)).astype(jnp.float32), scores, masks)


def _mean_grad(loss_fn: Callable[..., Any], params: PyTree, model_state: PyTree,
               batches: Sequence[Any]) -> PyTree:
    if not batches:
        raise ValueError("this score needs training batches: give the method an InitContext "
                         "with at least one batch (TrainConfig.init_batches >= 1)")

    def loss_only(p: PyTree, batch: Any) -> jax.Array:
        return loss_fn(p, model_state, batch)[0]

    grads = [jax.grad(loss_only)(params, b) for b in batches]
    return jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)


def _normalise(scores: PyTree, prunable: Prunable) -> PyTree:
    paths = leaf_paths(scores)
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    total = sum((jnp.sum(s) for p, s in zip(paths, leaves, strict=True) if prunable(p, s)),
                jnp.float32(0))
    total = jnp.where(total > 0, total, 1.0)
    return jax.tree_util.tree_unflatten(treedef, [s / total for s in leaves])


def snip_scores(loss_fn: Callable[..., Any], params: PyTree, model_state: PyTree,
                batches: Sequence[Any], *, prunable: Prunable = default_prunable) -> PyTree:
    """SNIP connection sensitivity ``|g * w|`` (``g`` the loss gradient averaged over
    ``batches``), normalised to sum to 1 over the prunable leaves (Lee et al., 2019).

    >>> import jax.numpy as jnp
    >>> loss = lambda p, s, b: (jnp.sum(p["w"] * b), (s, {}))
    >>> snip_scores(loss, {"w": jnp.array([[1.0, -3.0]])}, {}, [jnp.array([[2.0, 1.0]])])["w"]
    Array([[0.4, 0.6]], dtype=float32)
    """
    grads = _mean_grad(loss_fn, params, model_state, batches)
    raw = jax.tree_util.tree_map(lambda g, w: jnp.abs(g * w).astype(jnp.float32), grads, params)
    return _normalise(raw, prunable)


def _examples_per_class(batches: Sequence[Any], num_classes: int,
                        per_class: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first ``per_class`` examples of each class in ``batches`` (a fixed shape, so it
    works under ``jit``): ``(images, labels, weights)``, weight 0 where a class has fewer."""
    images = jnp.concatenate([jnp.asarray(b["image"]) for b in batches])
    labels = jnp.concatenate([jnp.asarray(b["label"]) for b in batches])
    if labels.ndim != 1:
        raise ValueError(f"GraSP picks {per_class} examples per class and needs one label per "
                         f"example (a classifier); got labels of shape {labels.shape} (a "
                         f"sequence model?); use SNIP or SynFlow there")
    picked = [jnp.nonzero(labels == c, size=per_class, fill_value=-1)[0]
              for c in range(num_classes)]
    index = jnp.concatenate(picked)
    weight = (index >= 0).astype(jnp.float32)
    index = jnp.maximum(index, 0)
    return images[index], labels[index], weight


def grasp_scores(
    loss_fn: Callable[..., Any], params: PyTree, model_state: PyTree, batches: Sequence[Any],
    *, apply_fn: ApplyFn | None = None, temperature: float = 200.0,
    samples_per_class: int | None = 10,
) -> PyTree:
    """GraSP scores ``S = -w * (H g)`` (Wang et al., 2020); GraSP removes the LARGEST.

    ``H g`` is a Hessian-vector product: the gradient of ``stopgrad(g) . g(w)``. With
    ``apply_fn`` the loss is the cross-entropy of ``logits / temperature`` on the first
    ``samples_per_class`` examples of each class found in ``batches`` (as the paper does);
    without it, ``loss_fn`` on ``batches`` as given (no temperature).

    >>> import jax.numpy as jnp
    >>> loss = lambda p, s, b: (0.5 * jnp.sum(p["w"] ** 2 * b), (s, {}))
    >>> grasp_scores(loss, {"w": jnp.array([1.0, 2.0])}, {}, [jnp.array([1.0, 1.0])])["w"]
    Array([-1., -4.], dtype=float32)
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not batches:
        raise ValueError("GraSP needs training batches (TrainConfig.init_batches >= 1)")
    if apply_fn is not None:
        first = batches[0]
        num_classes = int(np.shape(apply_fn(params, model_state, jnp.asarray(first["image"][:1]))
                                    )[-1])
        if samples_per_class:
            images, labels, weight = _examples_per_class(batches, num_classes, samples_per_class)
        else:
            images = jnp.concatenate([jnp.asarray(b["image"]) for b in batches])
            labels = jnp.concatenate([jnp.asarray(b["label"]) for b in batches])
            weight = jnp.ones(labels.shape, jnp.float32)

        def objective(p: PyTree) -> jax.Array:
            logits = apply_fn(p, model_state, images) / temperature
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.sum(losses * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    else:
        def objective(p: PyTree) -> jax.Array:
            return sum(loss_fn(p, model_state, b)[0] for b in batches) / len(batches)

    g = jax.lax.stop_gradient(jax.grad(objective)(params))

    def g_dot_grad(p: PyTree) -> jax.Array:
        grads = jax.grad(objective)(p)
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                   jax.tree_util.tree_leaves(grads),
                                                   strict=True))

    hg = jax.grad(g_dot_grad)(params)
    return jax.tree_util.tree_map(lambda w, h: (-w * h).astype(jnp.float32), params, hg)


def synflow_scores(apply_fn: ApplyFn, params: PyTree, model_state: PyTree,
                   input_shape: tuple[int, ...], masks: PyTree | None = None) -> PyTree:
    """SynFlow scores ``|w * dR/dw|`` with ``R = sum(f(|w| * mask, ones))`` (Tanaka et al.,
    2020): data-free, the network linearised by taking absolute values of every param.

    ``apply_fn`` runs in evaluation mode, so batch norm is the fixed affine map of its
    running statistics (mean 0, variance 1 at init), the linearisation of the paper.

    >>> import jax.numpy as jnp
    >>> f = lambda p, s, x: x @ p["a"] @ p["b"]
    >>> p = {"a": jnp.array([[2.0, -1.0]]), "b": jnp.array([[3.0], [4.0]])}
    >>> synflow_scores(f, p, {}, (1,))["a"]
    Array([[6., 4.]], dtype=float32)
    """
    ones = jnp.ones((1, *input_shape), jnp.float32)
    abs_params = jax.tree_util.tree_map(jnp.abs, params)
    if masks is not None:
        abs_params = zero_masked(abs_params, masks)

    def flow(p: PyTree) -> jax.Array:
        return jnp.sum(apply_fn(p, model_state, ones))

    grads = jax.grad(flow)(abs_params)
    return jax.tree_util.tree_map(lambda w, g: jnp.abs(w * g).astype(jnp.float32),
                                  abs_params, grads)
