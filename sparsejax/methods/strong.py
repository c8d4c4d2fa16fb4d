"""Strong lottery tickets: subnetworks of randomly initialised weights found by training
one score per weight.

* :func:`edge_popup` (Ramanujan et al. 2020): the weights stay frozen at their random
  init; each prunable leaf keeps the weights whose ``|score|`` is in its top ``density``
  fraction (or one threshold over all leaves with ``scope='global'``), through
  :func:`sparsejax.supermask` (the straight-through top-k). The optimizer trains the
  scores, so ``--weight-decay`` is weight decay on the scores, as in the paper.
* :func:`biprop` (binarized multi-prize tickets, Diffenderfer & Kailkhura 2021): the same
  scores; the effective weight is ``sign(w) * alpha * mask`` with one gain per leaf,
  ``alpha = ||mask * w||_1 / (number kept)``. Optionally the density ramps down from 1
  over the first epochs.
* :func:`supermask_weights`: the Edge-Popup scores with the weights trained as well (the
  "unfrozen" variant); one optimizer updates both.

Conventions of this module (what "prunable" means here):

* ``prunable(path, leaf)`` (default :func:`sparsejax.default_prunable`: every Dense and
  Conv kernel, the first layer and the classifier included, as in the paper) says which
  leaves get scores. Those leaves are redrawn at init by ``weight_init`` and masked.
* Other leaves (biases, norm scales) keep the model's own init, carry all-``True`` masks,
  and are frozen too (the paper uses no biases and batch norm without affine
  parameters: ``--model-option use_bias=false``, ``norm_affine=false``); in
  :func:`supermask_weights` they are trained with the weights.
* ``state.scores`` is a flat dict ``{leaf path: scores}`` over the prunable leaves only,
  e.g. ``{'fc1/kernel': ..., 'head/kernel': ...}``; ``state.masks`` has the params'
  structure and holds the top-k masks of the current scores, chosen at init and after
  every update (so ``effective_params`` needs only ``params`` and ``masks``).
  ``materialize(state, trainables)`` applies ``state.masks``, which is the top-k of the
  trainable scores in a train step, with the straight-through product of
  :func:`sparsejax.supermask`; so a step runs one exact top-k, not two. That top-k
  starts from the previous step's cuts, kept in ``state.extra['topk_cuts']``
  (:func:`sparsejax.core.topk.topk_mask_tracked`): a few counting passes instead of several.

The weight and score inits are in :mod:`sparsejax.methods.strong_init`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import optax

from sparsejax.core.masks import Prunable, default_prunable, prunable_except
from sparsejax.core.patterns import Pattern, method_pattern
from sparsejax.core.topk import Scope
from sparsejax.core.validation import check_sparsity
from sparsejax.methods.base import (
    Method,
    OutsideLoop,
)
from sparsejax.methods.registry import register_method
from sparsejax.methods.strong_init import (
    FAN_MODES,
    WEIGHT_INITS,
    FanMode,
    WeightInit,
    check_choice,
)
from sparsejax.methods.supermask import (
    SupermaskSettings,
    init_supermask,
    refresh_masks,
    supermask_advance,
    supermask_effective_params,
    supermask_materialize,
    supermask_trainables,
    supermask_update,
    supermask_with_trainables,
)

__all__ = [
    "score_supermask",
    "edge_popup",
    "biprop",
    "supermask_weights",
]

PyTree = Any

_DISTRIBUTIONS = ("uniform", "erk", "erdos_renyi", "global")


def _resolve_prunable(prunable: Prunable | None, dense_layers: Sequence[str] | str) -> Prunable:
    if isinstance(dense_layers, str):
        dense_layers = (dense_layers,)
    base = default_prunable if prunable is None else prunable
    return prunable_except(*dense_layers, base=base) if dense_layers else base


def score_supermask(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float,
    name: str,
    weight_init: WeightInit = "signed_constant",
    train_weights: bool = False,
    binarized: bool = False,
    scope: Scope = "layer",
    distribution: str = "uniform",
    fan_mode: FanMode = "fan_in",
    ramp_steps: int = 0,
    prunable: Prunable | None = None,
    dense_layers: Sequence[str] | str = (),
    pattern: str | Pattern = "unstructured",
) -> Method:
    """The engine behind :func:`edge_popup`, :func:`biprop` and :func:`supermask_weights`:
    trainable scores that choose a top-``density`` subnetwork of the weights.

    Args:
      optimizer: trains the scores (and the weights with ``train_weights``).
      sparsity: the fraction of prunable weights removed, in [0, 1).
      name: the method's name.
      weight_init: the init of the prunable weights, one of :data:`WEIGHT_INITS`.
      train_weights: also train the weights (and the non-prunable leaves).
      binarized: effective weights ``sign(w) * alpha * mask`` (see :func:`binarize`).
      scope: ``'layer'`` (top-k per leaf) or ``'global'`` (one threshold over all).
      distribution: with ``scope='layer'``, how the density is shared among leaves:
        ``'uniform'`` (every leaf keeps ``num_kept(density, size)``, the paper), ``'erk'``
        or ``'erdos_renyi'``; ``'global'`` is the same as ``scope='global'``.
      fan_mode: the fan of the weight init.
      ramp_steps: if positive, the density falls linearly from 1 at step 0 to its target
        at ``ramp_steps`` (each leaf's sparsity grows linearly).
      prunable: which leaves get scores (default: every kernel).
      dense_layers: regular expressions of paths kept dense, e.g. ``('^head/',)``.
      pattern: the sparsity pattern of every step's top-k (:mod:`sparsejax.core.patterns`):
        ``'unstructured'`` (default), ``'N:M'`` (the top ``N`` of ``|scores|`` in every
        group of ``M``; ``sparsity`` must be ``1 - N / M`` and ``distribution`` is moot),
        ``'block:B'`` or ``'channel'`` (each leaf's density from ``distribution``).
        Structured patterns need ``scope='layer'`` and no ``ramp_steps``; a prunable leaf
        that cannot carry the pattern is an error at ``init``, naming it.
    """
    check_sparsity(sparsity)
    check_choice("weight_init", weight_init, WEIGHT_INITS)
    check_choice("fan_mode", fan_mode, FAN_MODES)
    check_choice("scope", scope, ("layer", "global"))
    check_choice("distribution", distribution, _DISTRIBUTIONS)
    if distribution == "global":
        scope = "global"
    elif scope == "global" and distribution != "uniform":
        raise ValueError(f"scope='global' ranks all leaves jointly; distribution "
                         f"{distribution!r} applies to scope='layer' only")
    if isinstance(ramp_steps, bool) or int(ramp_steps) != ramp_steps or ramp_steps < 0:
        raise ValueError(f"ramp_steps must be a non-negative int, got {ramp_steps!r}")
    ramp_steps = int(ramp_steps)
    is_prunable = _resolve_prunable(prunable, dense_layers)
    target = 1.0 - float(sparsity)
    pattern = method_pattern(pattern, float(sparsity), name)
    if not pattern.ranks_globally:
        if scope == "global":
            raise ValueError(f"{name}: pattern {pattern} chooses a mask per leaf; it cannot "
                             f"be combined with scope='global' (or distribution 'global')")
        if ramp_steps:
            raise ValueError(f"{name}: pattern {pattern} is not supported with a density "
                             f"ramp (ramp_steps/ramp_epochs); use ramp 0")

    settings = SupermaskSettings(
        name=name, target=target, weight_init=weight_init, train_weights=train_weights,
        binarized=binarized, scope=scope, distribution=distribution, fan_mode=fan_mode,
        ramp_steps=ramp_steps, is_prunable=is_prunable, pattern=pattern)
    method = Method(name=name, init=functools.partial(init_supermask, settings, optimizer),
                    trainables=functools.partial(supermask_trainables, settings),
                    materialize=functools.partial(supermask_materialize, settings),
                    update=functools.partial(supermask_update, settings, optimizer),
                    effective_params=functools.partial(supermask_effective_params, settings))
    return method._replace(outside=OutsideLoop(
        with_trainables=functools.partial(supermask_with_trainables, settings),
        advance=supermask_advance,
        refresh=functools.partial(refresh_masks, settings), trains_weights=train_weights,
        scores_layout="by_path", reads_step=ramp_steps > 0))


def _ramp_steps(ramp_epochs: float, batches_per_epoch: int | None) -> int:
    if ramp_epochs < 0:
        raise ValueError(f"ramp_epochs must be >= 0, got {ramp_epochs}")
    if not ramp_epochs:
        return 0
    if batches_per_epoch is None:
        raise ValueError("ramp_epochs needs batches_per_epoch (the harness passes it)")
    return max(1, round(ramp_epochs * batches_per_epoch))


def edge_popup(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float,
    scope: Scope = "layer",
    distribution: str = "uniform",
    weight_init: WeightInit = "signed_constant",
    fan_mode: FanMode = "fan_in",
    prunable: Prunable | None = None,
    dense_layers: Sequence[str] | str = (),
    pattern: str = "unstructured",
) -> Method:
    """Edge-Popup: train scores over frozen random weights; evaluate the hard top-k mask.

    ``--method edge_popup --sparsity 0.5 --method-option weight_init=kaiming_normal``;
    options as in :func:`score_supermask` (``--method-option pattern=2:4``: the top 2 of
    every 4 scores, every step). Weights are drawn at init (default: signed
    Kaiming constant, the paper's best) and never change.

    >>> import jax, jax.numpy as jnp, optax
    >>> method = edge_popup(optax.sgd(0.1), sparsity=0.75)
    >>> state = method.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0))
    >>> int(state.masks["w"].sum()), sorted(state.scores)
    (4, ['w'])
    """
    return score_supermask(optimizer, sparsity=sparsity, name="edge_popup",
                           weight_init=weight_init, scope=scope, distribution=distribution,
                           fan_mode=fan_mode, prunable=prunable, dense_layers=dense_layers,
                           pattern=pattern)


def biprop(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float,
    scope: Scope = "layer",
    distribution: str = "uniform",
    weight_init: WeightInit = "kaiming_normal",
    fan_mode: FanMode = "fan_in",
    ramp_epochs: float = 0.0,
    batches_per_epoch: int | None = None,
    prunable: Prunable | None = None,
    dense_layers: Sequence[str] | str = (),
    pattern: str = "unstructured",
) -> Method:
    """Binarized multi-prize tickets: effective weights ``sign(w) * alpha * mask`` with
    the Edge-Popup scores choosing the mask (see :func:`binarized_supermask`).

    ``ramp_epochs`` lowers the density linearly from 1 to its target over the first
    epochs (the paper does this with ``scope='global'``); the harness passes
    ``batches_per_epoch``.

    >>> import jax, jax.numpy as jnp, optax
    >>> method = biprop(optax.sgd(0.1), sparsity=0.5)
    >>> state = method.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0))
    >>> w = method.effective_params(state)["w"]
    >>> int((w != 0).sum()), len(set(jnp.abs(w[w != 0]).tolist()))
    (8, 1)
    """
    return score_supermask(optimizer, sparsity=sparsity, name="biprop", weight_init=weight_init,
                           binarized=True, scope=scope, distribution=distribution,
                           fan_mode=fan_mode, ramp_steps=_ramp_steps(ramp_epochs,
                                                                     batches_per_epoch),
                           prunable=prunable, dense_layers=dense_layers, pattern=pattern)


def supermask_weights(
    optimizer: optax.GradientTransformation,
    *,
    sparsity: float,
    scope: Scope = "layer",
    distribution: str = "uniform",
    weight_init: WeightInit = "kaiming_normal",
    fan_mode: FanMode = "fan_in",
    prunable: Prunable | None = None,
    dense_layers: Sequence[str] | str = (),
    pattern: str = "unstructured",
) -> Method:
    """Edge-Popup scores with the weights trained too: the kept weights receive their
    gradient (``g * mask``, from :func:`sparsejax.supermask`), the scores theirs; one
    optimizer updates ``{'params', 'scores'}`` (its weight decay applies to both, pruned
    weights included). Non-prunable leaves (biases, norms) are trained too.

    >>> import jax, jax.numpy as jnp, optax
    >>> method = supermask_weights(optax.sgd(0.1), sparsity=0.5)
    >>> state = method.init({"w": jnp.ones((2, 4))}, jax.random.PRNGKey(0))
    >>> sorted(method.trainables(state))
    ['params', 'scores']
    """
    return score_supermask(optimizer, sparsity=sparsity, name="supermask_weights",
                           weight_init=weight_init, train_weights=True, scope=scope,
                           distribution=distribution, fan_mode=fan_mode, prunable=prunable,
                           dense_layers=dense_layers, pattern=pattern)


_BUILDERS: dict[str, Callable[..., Method]] = {
    "edge_popup": edge_popup,
    "biprop": biprop,
    "supermask_weights": supermask_weights,
}
for _name, _builder in _BUILDERS.items():
    register_method(_name, _builder)
