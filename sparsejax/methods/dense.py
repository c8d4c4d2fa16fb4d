"""The dense baseline: every weight trained, masks all ``True``."""

from __future__ import annotations

from typing import Any

import jax
import optax

from sparsejax.methods.base import (
    InitContext,
    Method,
    SparseState,
    apply_optimizer,
    params_as_they_are,
)

__all__ = ["dense"]


def dense(optimizer: optax.GradientTransformation) -> Method:
    """Plain training with ``optimizer``; the reference every sparse method is measured
    against.

    >>> import jax, jax.numpy as jnp, optax
    >>> method = dense(optax.sgd(0.1))
    >>> state = method.init({"w": jnp.ones(2)}, jax.random.PRNGKey(0))
    >>> state = method.update(state, {"w": jnp.array([1.0, -1.0])})
    >>> state.params["w"], int(state.step)
    (Array([0.9, 1.1], dtype=float32), 1)
    """

    def init(params: Any, rng: jax.Array, model_state: Any = None,
             context: InitContext | None = None) -> SparseState:
        del context
        return SparseState.create(params=params, rng=rng, opt_state=optimizer.init(params),
                                  model_state=model_state)

    def update(state: SparseState, grads: Any, **extra_args: Any) -> SparseState:
        params, opt_state = apply_optimizer(optimizer, grads, state.opt_state, state.params,
                                            **extra_args)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    return Method(
        name="dense",
        init=init,
        trainables=lambda state: state.params,
        materialize=params_as_they_are,
        update=update,
        effective_params=lambda state: state.params,
    )
