"""Sparse training with a mask chosen once: the engine for static sparse training and for
every "score, then keep the top fraction, then train the survivors" method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from sparsejax.core.distributions import select_masks
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern, method_pattern
from sparsejax.core.transforms import keep_pruned_zero, mask_gradients, zero_masked
from sparsejax.core.validation import check_same_structure, check_sparsity
from sparsejax.methods.base import (
    InitContext,
    MaskPhases,
    Method,
    SparseState,
    apply_optimizer,
    named_error,
    params_as_they_are,
)
from sparsejax.methods.draws import UniformDraw, draw_split

__all__ = ["fixed_mask", "masked_optimizer", "masked_weights_method", "static",
           "random_scores"]

MaskFn = Callable[[Any, jax.Array, Any, "InitContext | None"], Any]
"""``make_masks(params, rng, model_state, context) -> masks``: ``model_state`` (batch
statistics, ``{}`` without any) and ``context`` (the
:class:`~sparsejax.methods.base.InitContext`, ``None`` without data) are those given to
``init``, so scores can run the model as it is."""


def masked_optimizer(optimizer: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
    """``chain(mask_gradients(), optimizer, keep_pruned_zero())``, updated with
    ``masks=``: pruned weights get zero gradients (the gradients of ``w * m``), so slots
    never accumulate for them, and zero updates, so momentum and weight decay cannot
    revive them."""
    return optax.chain(mask_gradients(), optimizer, keep_pruned_zero())


_zero_masked = jax.jit(zero_masked)
""":func:`zero_masked` as one program for a tree: called eagerly (an init), ``jnp.where``
compiles a program per leaf shape (17 on ResNet-18)."""


def masked_weights_method(name: str, init: Any, update: Any,
                          phases: MaskPhases | None = None) -> Method:
    """A :class:`Method` that trains ``state.params`` under ``state.masks`` and keeps the
    pruned weights exactly zero there (with :func:`masked_optimizer`), so the forward
    pass uses the params as they are: fixed masks, gradual pruning and dynamic sparse
    training (``phases``: ``update`` split by its mask schedule, :class:`MaskPhases`)."""
    return Method(
        name=name,
        init=init,
        trainables=lambda state: state.params,
        materialize=params_as_they_are,
        update=update,
        effective_params=lambda state: zero_masked(state.params, state.masks),
        phases=phases,
    )


def fixed_mask(optimizer: optax.GradientTransformation, make_masks: MaskFn,
               name: str = "fixed_mask", *, fresh_init: bool = False) -> Method:
    """Train the weights under masks from ``make_masks(params, rng, model_state, context)``,
    fixed for good.

    Pruned weights are zeroed at init and stay exactly zero (:func:`masked_optimizer`);
    since ``state.params`` is zero wherever the mask is, the forward pass uses it as it
    is, with no masking pass per step.

    With ``fresh_init`` the masks are chosen on the ``params`` given to ``init`` and an
    independent draw, ``context.init_params(key)`` (see
    :class:`~sparsejax.methods.base.InitContext`), is trained under them: the protocol of
    the SNIP reference code. The draw's key is ``fold_in(rng, ...)`` of the method's key.
    """
    if not isinstance(fresh_init, bool):
        raise TypeError(f"fresh_init must be true or false, got {fresh_init!r}")
    chained = masked_optimizer(optimizer)

    def init(params: Any, rng: jax.Array, model_state: Any = None,
             context: InitContext | None = None) -> SparseState:
        model_state = {} if model_state is None else model_state
        try:  # e.g. select_masks naming a leaf that cannot carry the method's pattern
            masks = make_masks(params, jax.random.fold_in(rng, 0x6D61736B), model_state,
                               context)
        except ValueError as error:
            raise named_error(name, error) from None
        check_same_structure(params, masks)
        if fresh_init:
            if context is None or context.init_params is None:
                raise ValueError(f"{name} with fresh_init=True trains a second, independent "
                                 "init: call init with context=InitContext(..., "
                                 "init_params=key -> params) (sparsejax train passes it)")
            fresh = context.init_params(jax.random.fold_in(rng, 0x66726573))
            check_same_structure(params, fresh)
            params = fresh
        params = _zero_masked(params, masks)
        return SparseState.create(params=params, masks=masks, rng=rng,
                                  opt_state=chained.init(params), model_state=model_state)

    def update(state: SparseState, grads: Any, **extra_args: Any) -> SparseState:
        params, opt_state = apply_optimizer(chained, grads, state.opt_state, state.params,
                                            masks=state.masks, **extra_args)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

    return masked_weights_method(name, init, update)


def random_scores(params: Any, rng: jax.Array) -> Any:
    """Uniform random scores with the structure of ``params`` (one key per leaf,
    ``split(rng, leaves)[i]``; one compiled program per set of shapes,
    :func:`~sparsejax.methods.draws.draw_split`)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = [tuple(jax.numpy.shape(p)) for p in leaves]
    return jax.tree_util.tree_unflatten(treedef, draw_split(UniformDraw(), rng, shapes))


def static(
    optimizer: optax.GradientTransformation,
    sparsity: float,
    distribution: str = "erk",
    *,
    pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None,
    name: str = "static",
) -> Method:
    """Static sparse training: a random mask with the given distribution, never changed.

    ``pattern`` (:mod:`sparsejax.core.patterns`, e.g. ``"2:4"``) constrains which weights the
    mask may keep; an N:M pattern fixes the density at N/M, so ``sparsity`` must be
    ``1 - N/M``. ``name`` labels the method (and its errors): the dynamic methods start
    from this mask under their own name.

    >>> import jax, jax.numpy as jnp, optax
    >>> method = static(optax.sgd(0.1), sparsity=0.75, distribution="uniform")
    >>> state = method.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0))
    >>> int(state.masks["w"].sum()), float(state.params["w"].sum())
    (4, 4.0)
    """
    check_sparsity(sparsity)
    pattern = method_pattern(pattern, sparsity, name)

    def make_masks(params: Any, rng: jax.Array, model_state: Any,
                   context: InitContext | None) -> Any:
        del model_state, context
        return select_masks(random_scores(params, rng), 1.0 - sparsity, distribution,
                            prunable=prunable, overrides=overrides, pattern=pattern)

    return fixed_mask(optimizer, make_masks, name=name)
