"""Compiled train and eval steps, the same for every method.

A loss function has one signature throughout the library::

    loss_fn(params, model_state, batch) -> (loss, (new_model_state, metrics))

where ``model_state`` holds non-trainable collections such as batch statistics (``{}``
for models without any) and ``metrics`` is a dict of scalars. :func:`stateless_loss`
adapts a plain ``loss(params, batch) -> scalar``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.methods.base import Method, SparseState

__all__ = ["LossFn", "stateless_loss", "make_train_step"]

LossFn = Callable[[Any, Any, Any], tuple[jax.Array, tuple[Any, dict[str, jax.Array]]]]


def stateless_loss(loss: Callable[[Any, Any], jax.Array]) -> LossFn:
    """Adapt ``loss(params, batch) -> scalar`` to the library's :data:`LossFn`.

    >>> import jax.numpy as jnp
    >>> fn = stateless_loss(lambda p, b: jnp.sum(p["w"] * b))
    >>> fn({"w": jnp.ones(2)}, {}, jnp.array([1.0, 2.0]))[0]
    Array(3., dtype=float32)
    """

    def loss_fn(params: Any, model_state: Any, batch: Any):
        return loss(params, batch), (model_state, {})

    return loss_fn


def make_train_step(
    method: Method, loss_fn: LossFn, *, axis_name: str | None = None,
    skip_nonfinite: bool = False,
) -> Callable[[SparseState, Any], tuple[SparseState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)`` for any method; jit or pmap it.

    Under ``jax.pmap(..., axis_name=axis_name)`` the gradients, batch statistics and
    metrics are averaged across devices with ``lax.pmean`` before the method sees them,
    so every mask decision is made on the same global gradient on every device.

    ``metrics["finite"]`` is false when the loss or a gradient is NaN or inf. With
    ``skip_nonfinite`` such a step changes nothing but the step counter (the batch is
    consumed), so a NaN never reaches the weights, scores or masks; without it the
    caller decides (the training loop stops with an error naming the step).

    >>> import jax, jax.numpy as jnp, optax, sparsejax
    >>> method = sparsejax.dense(optax.sgd(0.5))
    >>> step = jax.jit(make_train_step(
    ...     method, stateless_loss(lambda p, b: jnp.sum((p["w"] - b) ** 2))))
    >>> state = method.init({"w": jnp.zeros(2)}, jax.random.PRNGKey(0))
    >>> state, metrics = step(state, jnp.array([1.0, 2.0]))
    >>> state.params["w"], metrics["loss"]
    (Array([1., 2.], dtype=float32), Array(5., dtype=float32))
    """

    def objective(trainables: Any, state: SparseState, batch: Any):
        params = method.materialize(state, trainables)
        loss, (model_state, metrics) = loss_fn(params, state.model_state, batch)
        penalty = method.penalty(state, trainables)
        return loss + penalty, (loss, penalty, model_state, metrics)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: SparseState, batch: Any) -> tuple[SparseState, dict[str, jax.Array]]:
        (_, (loss, penalty, model_state, metrics)), grads = grad_fn(
            method.trainables(state), state, batch
        )
        metrics = {**metrics, "loss": loss, "penalty": penalty}
        if axis_name is not None:
            grads, model_state, metrics = lax.pmean((grads, model_state, metrics), axis_name)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)] or [True]))
        new_state = method.update(state.replace(model_state=model_state), grads)
        if skip_nonfinite:
            skipped = state.replace(step=state.step + 1)
            new_state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old), new_state, skipped)
        metrics["finite"] = finite
        return new_state, metrics

    return train_step
