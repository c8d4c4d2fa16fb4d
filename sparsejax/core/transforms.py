"""optax transforms that take the masks as an extra argument.

They are ``optax.GradientTransformationExtraArgs``: inside ``optax.chain`` the masks are
passed by keyword to ``update(..., masks=masks)`` and reach them, while optax's own
transforms ignore the extra argument. Put :func:`keep_pruned_zero` last in a chain and
no momentum, Adam moment or weight decay can move a pruned weight off zero; put
:func:`mask_gradients` first as well to keep the optimizer slots of pruned weights at
zero.

>>> import jax.numpy as jnp, optax
>>> params = {"w": jnp.array([1.0, 0.0])}
>>> masks = {"w": jnp.array([True, False])}
>>> opt = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9),
...                   keep_pruned_zero())
>>> state = opt.init(params)
>>> updates, state = opt.update({"w": jnp.array([0.5, 0.5])}, state, params, masks=masks)
>>> optax.apply_updates(params, updates)["w"]
Array([0.949, 0.   ], dtype=float32)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.core.validation import check_same_structure

__all__ = ["keep_pruned_zero", "mask_gradients", "zero_masked"]


class _MaskedUpdateState(NamedTuple):
    """Stateless."""


def zero_masked(tree: Any, masks: Any) -> Any:
    """``tree`` with the entries where ``masks`` is ``False`` set to zero."""
    check_same_structure(tree, masks, reference_name="updates")
    return jax.tree_util.tree_map(
        lambda u, m: jnp.where(m, u, jnp.zeros((), jnp.result_type(u))), tree, masks
    )


def _masking_transform(name: str) -> optax.GradientTransformationExtraArgs:
    def init_fn(params: Any) -> _MaskedUpdateState:
        del params
        return _MaskedUpdateState()

    def update_fn(updates: Any, state: _MaskedUpdateState, params: Any = None, *,
                  masks: Any = None, **extra_args: Any) -> tuple[Any, _MaskedUpdateState]:
        del params, extra_args
        if masks is None:
            raise ValueError(
                f"{name}() needs the masks: call update(updates, state, params, masks=masks)"
            )
        return zero_masked(updates, masks), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def keep_pruned_zero() -> optax.GradientTransformationExtraArgs:
    """Zero the updates of pruned weights (place it last in an ``optax.chain``).

    Pruned weights that are zero stay exactly zero whatever comes before in the chain.
    """
    return _masking_transform("keep_pruned_zero")


def mask_gradients() -> optax.GradientTransformationExtraArgs:
    """Zero the incoming gradients of pruned weights (place it first in a chain), so that
    optimizer slots such as momentum never accumulate for them."""
    return _masking_transform("mask_gradients")
