"""The engine of the score methods (:func:`sparsejax.edge_popup`, :func:`sparsejax.biprop`,
:func:`sparsejax.supermask_weights`): one checked :class:`SupermaskSettings`, and every
piece of the method (the top-k masks of the scores, the straight-through forward, init,
the update after the optimizer, the effective weights) as a function of it, which
:func:`sparsejax.methods.strong.score_supermask` assembles into a Method. The binarized
weights of :func:`sparsejax.biprop` (``sign(w) * alpha * mask``) are here too.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax.core._tree import path_str
from sparsejax.core.distributions import layer_densities, warn_empty_layers
from sparsejax.core.masks import Prunable
from sparsejax.core.patterns import Pattern, check_pattern
from sparsejax.core.ste import pattern_masks, supermask, supermask_product
from sparsejax.core.topk import Scope, num_kept, topk_mask_tracked
from sparsejax.methods.base import InitContext, SparseState, apply_optimizer, named_error
from sparsejax.methods.strong_init import init_scores, init_weights, prunable_paths

__all__ = [
    "TOPK_CUTS_KEY",
    "SupermaskSettings",
    "binarize",
    "binarized_supermask",
    "target_densities",
    "densities_at",
    "supermask_masks",
    "supermask_forward",
    "init_supermask",
    "refresh_masks",
    "supermask_effective_params",
]

PyTree = Any

TOPK_CUTS_KEY = "topk_cuts"
"""``state.extra`` key of the last top-k cuts of the score methods (one row per leaf, or
one for ``scope='global'``), where the next step's search starts
(:func:`sparsejax.core.topk.topk_mask_tracked`); they change the time, never the masks."""

_WEIGHT_SALT = 0x57454947  # fold-in constants that separate the init streams
_SCORE_SALT = 0x53434F52


# --------------------------------------------------------------------------- binarized


def _binarize_kept(u: jax.Array) -> jax.Array:
    """``sign(u) * alpha`` for ``u = w * mask``, ``alpha`` the mean ``|u|`` of the kept
    non-zero entries (0 when nothing is kept)."""
    dtype = jnp.result_type(u)
    kept = jnp.sum(u != 0, dtype=jnp.int32)
    alpha = jnp.sum(jnp.abs(u).astype(jnp.float32)) / jnp.maximum(kept, 1).astype(jnp.float32)
    return (jnp.sign(u) * alpha.astype(dtype)).astype(dtype)


def binarize(w: PyTree, mask: PyTree) -> PyTree:
    """Binarized masked weights ``sign(w) * alpha * mask``, one gain per leaf,
    ``alpha = ||mask * w||_1 / (number kept)``.

    The count is of kept weights that are not exactly zero (a zero weight adds nothing to
    the layer either way); with the inits of this module no weight is zero.

    >>> import jax.numpy as jnp
    >>> binarize(jnp.array([0.5, -1.5, 2.0, 4.0]), jnp.array([True, True, False, True]))
    Array([ 2., -2.,  0.,  2.], dtype=float32)
    """

    def one(w: jax.Array, m: jax.Array) -> jax.Array:
        return _binarize_kept(jnp.where(m, w, jnp.zeros((), jnp.result_type(w))))

    return jax.tree_util.tree_map(one, w, mask)


def _straight_through(target: jax.Array, surrogate: jax.Array) -> jax.Array:
    """Forward exactly ``target``; gradients flow through ``surrogate``."""
    return lax.stop_gradient(target) + (surrogate - lax.stop_gradient(surrogate))


def binarized_supermask(
    w: PyTree,
    scores: PyTree,
    density: Any,
    *,
    scope: Scope = "layer",
    check_finite_scores: bool = True,
    pattern: str | Pattern = "unstructured",
) -> PyTree:
    """The binarized supermask of multi-prize tickets: forward ``sign(w) * alpha * mask``
    (see :func:`binarize`) with the mask of :func:`sparsejax.supermask`; backward the
    score gradient of the paper, ``g_q * |w|`` for the gradient ``g_q`` of the gained mask
    ``alpha * mask``, which (since ``w_eff = sign(w) * alpha * mask`` and the ranking uses
    ``|scores|``) is ``g * w * sign(scores)`` for the gradient ``g`` of the effective
    weight: the same straight-through estimate as Edge-Popup, taken from ``supermask``.

    >>> import jax, jax.numpy as jnp
    >>> w, s = jnp.array([1.0, -3.0, 2.0, 4.0]), jnp.array([0.9, -0.8, 0.1, 0.2])
    >>> binarized_supermask(w, s, 0.5)
    Array([ 2., -2.,  0.,  0.], dtype=float32)
    >>> jax.grad(lambda s: binarized_supermask(w, s, 0.5).sum())(s)
    Array([1., 3., 2., 4.], dtype=float32)
    """
    masked = supermask(w, scores, density, scope=scope, check_finite_scores=check_finite_scores,
                       pattern=pattern)
    return jax.tree_util.tree_map(lambda u: _straight_through(_binarize_kept(u), u), masked)


class SupermaskSettings(NamedTuple):
    """The checked options of :func:`score_supermask` (documented there), with
    ``is_prunable`` resolved from ``prunable`` and ``dense_layers`` and ``target`` the
    density ``1 - sparsity``."""

    name: str
    target: float
    weight_init: str
    train_weights: bool
    binarized: bool
    scope: Scope
    distribution: str
    fan_mode: str
    ramp_steps: int
    is_prunable: Prunable
    pattern: Pattern

    @property
    def patterned(self) -> bool:
        """Whether the top-k is per leaf in a structured pattern (no tracked cuts)."""
        return not self.pattern.ranks_globally


def target_densities(settings: SupermaskSettings, params: PyTree) -> dict[str, float]:
    """Target density per prunable path (Python floats, from shapes only)."""
    name, target, scope = settings.name, settings.target, settings.scope
    fixed = settings.pattern.fixed_density is not None
    paths = prunable_paths(params, settings.is_prunable)
    if not paths:
        raise ValueError(f"{name}: the prunable filter selects no leaf of the params")
    if scope == "global" or settings.distribution == "uniform" or fixed:
        sizes = {path_str(p): math.prod(jnp.shape(leaf)) for p, leaf in
                 jax.tree_util.tree_flatten_with_path(params)[0]}
        if not fixed:  # an N:M pattern keeps N of every group
            empty = (paths if num_kept(target, sum(sizes[p] for p in paths)) == 0
                     else []) if scope == "global" else [
                p for p in paths if num_kept(target, sizes[p]) == 0]
            warn_empty_layers(target, empty)
        return {p: target for p in paths}
    tree = layer_densities(params, target, settings.distribution, prunable=settings.is_prunable)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    by_path = {path_str(p): d for p, d in flat}
    return {p: by_path[p] for p in paths}


def densities_at(settings: SupermaskSettings, targets: dict[str, float], step: jax.Array) -> Any:
    """Densities of the top-k at ``step``: a dict per path, or one number (global); with
    ``ramp_steps``, each falls linearly from 1 to its target."""
    if settings.ramp_steps:
        progress = jnp.minimum(step.astype(jnp.float32) / settings.ramp_steps, 1.0)
        current = {p: 1.0 - (1.0 - d) * progress for p, d in targets.items()}
    else:
        current = dict(targets)
    return current[next(iter(current))] if settings.scope == "global" else current


def _select(settings: SupermaskSettings, params: PyTree) -> dict[str, jax.Array]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_str(p): leaf for p, leaf in flat if settings.is_prunable(path_str(p), leaf)}


def _replace(params: PyTree, new: dict[str, jax.Array]) -> PyTree:
    return jax.tree_util.tree_map_with_path(lambda p, leaf: new.get(path_str(p), leaf), params)


def supermask_masks(settings: SupermaskSettings, params: PyTree, scores: dict[str, jax.Array],
                    step: jax.Array, cuts: jax.Array | None) -> tuple[PyTree, jax.Array]:
    """The top-k masks of ``scores`` at ``step`` (all ``True`` on leaves without scores)
    and the cuts that start the next step's search (scores move little per step, so the
    search starts next to the last cut)."""
    density = densities_at(settings, target_densities(settings, params), step)
    if settings.patterned:
        # One exact top-k per group (N:M), or of the block or channel sums, per leaf;
        # no cuts to track: they keep their shape (one row per leaf), unused.
        chosen = pattern_masks(scores, settings.pattern, density, check_finite_scores=False)
        if cuts is None:
            cuts = jnp.zeros((len(scores), 2), jnp.float32)
    else:
        chosen, cuts = topk_mask_tracked(scores, density, cuts, scope=settings.scope,
                                         check_finite_scores=False, by_magnitude=True)
    masks = jax.tree_util.tree_map_with_path(
        lambda p, leaf: chosen.get(path_str(p), jnp.ones(jnp.shape(leaf), bool)), params)
    return masks, cuts


def supermask_forward(settings: SupermaskSettings, params: PyTree,
                      scores: dict[str, jax.Array], masks: PyTree) -> PyTree:
    """The training forward's weights: the straight-through supermask product with
    ``masks``, already chosen from these scores by the last update (one top-k per step
    instead of two); binarized with ``binarized``."""
    chosen = _select(settings, masks)
    masked = {p: supermask_product(w, scores[p], chosen[p])
              for p, w in _select(settings, params).items()}
    if settings.binarized:
        masked = {p: _straight_through(_binarize_kept(u), u) for p, u in masked.items()}
    return _replace(params, masked)


def init_supermask(settings: SupermaskSettings, optimizer: optax.GradientTransformation,
                   params: PyTree, rng: jax.Array, model_state: PyTree = None,
                   context: InitContext | None = None) -> SparseState:
    """The method's ``init``: weights drawn by ``weight_init``, scores, and the masks (and
    cuts) of those scores at step 0."""
    del context
    if settings.patterned:
        try:
            check_pattern(settings.pattern, params, prunable=settings.is_prunable)
        except ValueError as error:
            raise named_error(settings.name, error) from None
    targets = target_densities(settings, params)
    leaf_density = jax.tree_util.tree_map_with_path(
        lambda p, _: targets.get(path_str(p), 1.0), params)
    params = init_weights(params, jax.random.fold_in(rng, _WEIGHT_SALT), settings.weight_init,
                          density=leaf_density, fan_mode=settings.fan_mode,
                          prunable=settings.is_prunable)
    scores = init_scores(params, jax.random.fold_in(rng, _SCORE_SALT), settings.is_prunable)
    values = {"params": params, "scores": scores} if settings.train_weights else scores
    masks, cuts = supermask_masks(settings, params, scores, jnp.zeros((), jnp.int32), None)
    return SparseState.create(
        params=params, rng=rng, opt_state=optimizer.init(values),
        masks=masks, scores=scores, extra={TOPK_CUTS_KEY: cuts},
        model_state=model_state)


def supermask_trainables(settings: SupermaskSettings, state: SparseState) -> PyTree:
    if settings.train_weights:
        return {"params": state.params, "scores": state.scores}
    return state.scores


def supermask_materialize(settings: SupermaskSettings, state: SparseState,
                          values: PyTree) -> PyTree:
    if settings.train_weights:
        return supermask_forward(settings, values["params"], values["scores"], state.masks)
    return supermask_forward(settings, state.params, values, state.masks)


def supermask_with_trainables(settings: SupermaskSettings, state: SparseState,
                     values: PyTree) -> SparseState:
    if settings.train_weights:
        return state.replace(params=values["params"], scores=values["scores"])
    return state.replace(scores=values)


def supermask_advance(state: SparseState) -> SparseState:
    return state.replace(step=state.step + 1)


def refresh_masks(settings: SupermaskSettings, state: SparseState) -> SparseState:
    """The state with the masks (and cuts) of its scores at its step."""
    masks, cuts = supermask_masks(settings, state.params, state.scores, state.step,
                                  state.extra[TOPK_CUTS_KEY])
    return state.replace(masks=masks, extra={**state.extra, TOPK_CUTS_KEY: cuts})


def supermask_update(settings: SupermaskSettings, optimizer: optax.GradientTransformation,
            state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
    values, opt_state = apply_optimizer(optimizer, grads, state.opt_state,
                                        supermask_trainables(settings, state), **extra_args)
    stepped = supermask_with_trainables(settings, state, values).replace(opt_state=opt_state)
    return refresh_masks(settings, supermask_advance(stepped))


def supermask_effective_params(settings: SupermaskSettings, state: SparseState) -> PyTree:
    """The hard-masked weights of evaluation and export (binarized with ``binarized``)."""
    chosen = state.masks
    if settings.binarized:
        kept = {p: binarize(w, m) for (p, w), m in
                zip(_select(settings, state.params).items(), _select(settings, chosen).values(),
                    strict=True)}
        return _replace(state.params, kept)
    return jax.tree_util.tree_map(
        lambda w, m: jnp.where(m, w, jnp.zeros((), jnp.result_type(w))), state.params, chosen)
