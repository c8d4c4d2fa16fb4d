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

Weight inits (``weight_init``; fan = ``fan_in`` or ``fan_out`` of the leaf, Flax's
convention: the last axis is the output, the one before it the input, the others the
receptive field; gain ``sqrt(2)`` for ReLU):

* ``'kaiming_normal'``: ``N(0, (gain / sqrt(fan))**2)``;
* ``'signed_constant'``: ``sign * gain / sqrt(fan)`` with a random sign per weight;
* ``'scaled_kaiming_normal'`` and ``'scaled_signed_constant'``: the std divided by
  ``sqrt(density)`` of the leaf (the paper's scaled variants, for sparse subnetworks);
* ``'model'``: keep the weights the model was initialised with.

Scores start as ``uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's kaiming-uniform
with ``a = sqrt(5)``, the paper's score init).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax.core._tree import path_str
from sparsejax.core.distributions import layer_densities, warn_empty_layers
from sparsejax.core.masks import Prunable, default_prunable, prunable_except
from sparsejax.core.patterns import Pattern, check_pattern, method_pattern
from sparsejax.core.ste import pattern_masks, supermask, supermask_product
from sparsejax.core.topk import Scope, num_kept, topk_mask_tracked
from sparsejax.core.validation import check_sparsity
from sparsejax.methods.base import (
    InitContext,
    Method,
    OutsideLoop,
    SparseState,
    apply_optimizer,
    named_error,
)
from sparsejax.methods.registry import register_method

__all__ = [
    "WEIGHT_INITS",
    "FAN_MODES",
    "fans",
    "init_weights",
    "init_scores",
    "binarize",
    "binarized_supermask",
    "score_supermask",
    "edge_popup",
    "biprop",
    "supermask_weights",
]

PyTree = Any
WeightInit = Literal["model", "kaiming_normal", "signed_constant", "scaled_kaiming_normal",
                     "scaled_signed_constant"]
FanMode = Literal["fan_in", "fan_out"]

WEIGHT_INITS: tuple[str, ...] = ("model", "kaiming_normal", "signed_constant",
                                 "scaled_kaiming_normal", "scaled_signed_constant")
"""Names accepted by ``weight_init``."""
FAN_MODES: tuple[str, ...] = ("fan_in", "fan_out")
_DISTRIBUTIONS = ("uniform", "erk", "erdos_renyi", "global")
RELU_GAIN = math.sqrt(2.0)
TOPK_CUTS_KEY = "topk_cuts"
"""``state.extra`` key of the last top-k cuts of the score methods (one row per leaf, or
one for ``scope='global'``), where the next step's search starts
(:func:`sparsejax.core.topk.topk_mask_tracked`); they change the time, never the masks."""
_WEIGHT_SALT = 0x57454947  # fold-in constants that separate the init streams
_SCORE_SALT = 0x53434F52


# --------------------------------------------------------------------------- inits


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel: ``(in * receptive, out * receptive)`` where the
    last axis is the output, the one before it the input, the others the receptive field.

    >>> fans((784, 300)), fans((3, 3, 16, 32))
    ((784, 300), (144, 288))
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"fans need a kernel with at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _leaf_keys(rng: jax.Array, n: int) -> list[jax.Array]:
    return [jax.random.fold_in(rng, i) for i in range(n)]


def init_weights(
    params: PyTree,
    rng: jax.Array,
    weight_init: WeightInit = "signed_constant",
    *,
    density: float | PyTree = 1.0,
    fan_mode: FanMode = "fan_in",
    gain: float = RELU_GAIN,
    prunable: Prunable = default_prunable,
) -> PyTree:
    """Redraw the prunable leaves of ``params`` with one of the Edge-Popup weight inits.

    Only the shapes and dtypes of the prunable leaves are used (one key per leaf,
    ``fold_in(rng, leaf index)``); the other leaves are returned unchanged.

    Args:
      params: the params pytree.
      rng: a PRNG key.
      weight_init: one of :data:`WEIGHT_INITS` (see the module docstring).
      density: for the ``scaled_*`` inits, the density of each leaf: one number or a tree
        of numbers with the structure of ``params``; the std is divided by its sqrt.
      fan_mode: ``'fan_in'`` (the paper's default) or ``'fan_out'``.
      gain: ``sqrt(2)`` for ReLU networks.
      prunable: which leaves are redrawn.

    >>> import jax, jax.numpy as jnp
    >>> p = {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)}
    >>> w = init_weights(p, jax.random.PRNGKey(0), "signed_constant")["w"]
    >>> sorted(set(jnp.abs(w).ravel().tolist())) == [float(jnp.float32(0.5))]  # sqrt(2/8)
    True
    >>> w2 = init_weights(p, jax.random.PRNGKey(0), "scaled_signed_constant", density=0.25)
    >>> bool(jnp.all(w2["w"] == 2 * w))
    True
    """
    _check_choice("weight_init", weight_init, WEIGHT_INITS)
    _check_choice("fan_mode", fan_mode, FAN_MODES)
    if weight_init == "model":
        return params
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if isinstance(density, (int, float)) or getattr(density, "ndim", None) == 0:
        densities = [density] * len(flat)
    else:
        densities = jax.tree_util.tree_leaves(density)
        if len(densities) != len(flat):
            raise ValueError("density must be one number or a tree with the params' structure")
    keys = _leaf_keys(rng, len(flat))
    out = []
    for (path, leaf), key, leaf_density in zip(flat, keys, densities, strict=True):
        if not prunable(path_str(path), leaf):
            out.append(leaf)
            continue
        fan_in, fan_out = fans(jnp.shape(leaf))
        std = gain / math.sqrt(fan_in if fan_mode == "fan_in" else fan_out)
        if weight_init.startswith("scaled_"):
            if not 0 < float(leaf_density) <= 1:
                raise ValueError(f"scaled inits need densities in (0, 1], got {leaf_density}")
            std = std / math.sqrt(float(leaf_density))
        dtype = jnp.result_type(leaf)
        z = jax.random.normal(key, jnp.shape(leaf), jnp.float32)
        if weight_init.endswith("kaiming_normal"):
            w = z * jnp.float32(std)
        else:
            w = jnp.where(z >= 0, jnp.float32(std), jnp.float32(-std))
        out.append(w.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _prunable_paths(params: PyTree, prunable: Prunable) -> list[str]:
    return [path_str(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if prunable(path_str(p), leaf)]


def init_scores(params: PyTree, rng: jax.Array,
                prunable: Prunable = default_prunable) -> dict[str, jax.Array]:
    """Edge-Popup scores: ``{path: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))}`` for every
    prunable leaf (float32, the leaf's shape; one key per leaf index).

    >>> import jax, jax.numpy as jnp
    >>> s = init_scores({"w": jnp.zeros((100, 4)), "b": jnp.zeros(4)}, jax.random.PRNGKey(0))
    >>> list(s), s["w"].shape, bool(jnp.all(jnp.abs(s["w"]) <= 0.1))
    (['w'], (100, 4), True)
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = _leaf_keys(rng, len(flat))
    scores = {}
    for (path, leaf), key in zip(flat, keys, strict=True):
        name = path_str(path)
        if prunable(name, leaf):
            bound = 1.0 / math.sqrt(fans(jnp.shape(leaf))[0])
            scores[name] = jax.random.uniform(key, jnp.shape(leaf), jnp.float32,
                                              -bound, bound)
    return scores


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


# --------------------------------------------------------------------------- engine


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
    _check_choice("weight_init", weight_init, WEIGHT_INITS)
    _check_choice("fan_mode", fan_mode, FAN_MODES)
    _check_choice("scope", scope, ("layer", "global"))
    _check_choice("distribution", distribution, _DISTRIBUTIONS)
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
    patterned = not pattern.ranks_globally
    if patterned:
        if scope == "global":
            raise ValueError(f"{name}: pattern {pattern} chooses a mask per leaf; it cannot "
                             f"be combined with scope='global' (or distribution 'global')")
        if ramp_steps:
            raise ValueError(f"{name}: pattern {pattern} is not supported with a density "
                             f"ramp (ramp_steps/ramp_epochs); use ramp 0")

    fixed = pattern.fixed_density is not None

    def target_densities(params: PyTree) -> dict[str, float]:
        """Target density per prunable path (Python floats, from shapes only)."""
        paths = _prunable_paths(params, is_prunable)
        if not paths:
            raise ValueError(f"{name}: the prunable filter selects no leaf of the params")
        if scope == "global" or distribution == "uniform" or fixed:
            sizes = {path_str(p): math.prod(jnp.shape(leaf)) for p, leaf in
                     jax.tree_util.tree_flatten_with_path(params)[0]}
            if not fixed:  # an N:M pattern keeps N of every group
                empty = (paths if num_kept(target, sum(sizes[p] for p in paths)) == 0
                         else []) if scope == "global" else [
                    p for p in paths if num_kept(target, sizes[p]) == 0]
                warn_empty_layers(target, empty)
            return {p: target for p in paths}
        tree = layer_densities(params, target, distribution, prunable=is_prunable)
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        by_path = {path_str(p): d for p, d in flat}
        return {p: by_path[p] for p in paths}

    def densities_at(targets: dict[str, float], step: jax.Array) -> Any:
        """Densities of the top-k at ``step``: a dict per path, or one number (global)."""
        if ramp_steps:
            progress = jnp.minimum(step.astype(jnp.float32) / ramp_steps, 1.0)
            current = {p: 1.0 - (1.0 - d) * progress for p, d in targets.items()}
        else:
            current = dict(targets)
        return current[next(iter(current))] if scope == "global" else current

    def select(params: PyTree) -> dict[str, jax.Array]:
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        return {path_str(p): leaf for p, leaf in flat if is_prunable(path_str(p), leaf)}

    def replace(params: PyTree, new: dict[str, jax.Array]) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda p, leaf: new.get(path_str(p), leaf), params)

    def masks_of(params: PyTree, scores: dict[str, jax.Array], step: jax.Array,
                 cuts: jax.Array | None) -> tuple[PyTree, jax.Array]:
        """The top-k masks of ``scores`` and the cuts that start the next step's search
        (scores move little per step, so the search starts next to the last cut)."""
        density = densities_at(target_densities(params), step)
        if patterned:
            # One exact top-k per group (N:M), or of the block or channel sums, per leaf;
            # no cuts to track: they keep their shape (one row per leaf), unused.
            chosen = pattern_masks(scores, pattern, density, check_finite_scores=False)
            if cuts is None:
                cuts = jnp.zeros((len(scores), 2), jnp.float32)
        else:
            chosen, cuts = topk_mask_tracked(scores, density, cuts, scope=scope,
                                             check_finite_scores=False, by_magnitude=True)
        masks = jax.tree_util.tree_map_with_path(
            lambda p, leaf: chosen.get(path_str(p), jnp.ones(jnp.shape(leaf), bool)), params)
        return masks, cuts

    def forward(params: PyTree, scores: dict[str, jax.Array], masks: PyTree) -> PyTree:
        # The supermask product with the mask of this step, already chosen from these
        # scores by the last update: one top-k per step instead of two.
        chosen = select(masks)
        masked = {p: supermask_product(w, scores[p], chosen[p])
                  for p, w in select(params).items()}
        if binarized:
            masked = {p: _straight_through(_binarize_kept(u), u) for p, u in masked.items()}
        return replace(params, masked)

    def init(params: PyTree, rng: jax.Array, model_state: PyTree = None,
             context: InitContext | None = None) -> SparseState:
        del context
        if patterned:
            try:
                check_pattern(pattern, params, prunable=is_prunable)
            except ValueError as error:
                raise named_error(name, error) from None
        targets = target_densities(params)
        leaf_density = jax.tree_util.tree_map_with_path(
            lambda p, _: targets.get(path_str(p), 1.0), params)
        params = init_weights(params, jax.random.fold_in(rng, _WEIGHT_SALT), weight_init,
                              density=leaf_density, fan_mode=fan_mode, prunable=is_prunable)
        scores = init_scores(params, jax.random.fold_in(rng, _SCORE_SALT), is_prunable)
        values = {"params": params, "scores": scores} if train_weights else scores
        masks, cuts = masks_of(params, scores, jnp.zeros((), jnp.int32), None)
        return SparseState.create(
            params=params, rng=rng, opt_state=optimizer.init(values),
            masks=masks, scores=scores, extra={TOPK_CUTS_KEY: cuts},
            model_state=model_state)

    def trainables(state: SparseState) -> PyTree:
        if train_weights:
            return {"params": state.params, "scores": state.scores}
        return state.scores

    def materialize(state: SparseState, values: PyTree) -> PyTree:
        if train_weights:
            return forward(values["params"], values["scores"], state.masks)
        return forward(state.params, values, state.masks)

    def with_trainables(state: SparseState, values: PyTree) -> SparseState:
        if train_weights:
            return state.replace(params=values["params"], scores=values["scores"])
        return state.replace(scores=values)

    def advance(state: SparseState) -> SparseState:
        return state.replace(step=state.step + 1)

    def refresh(state: SparseState) -> SparseState:
        """The masks (and cuts) of the state's scores at its step."""
        masks, cuts = masks_of(state.params, state.scores, state.step,
                               state.extra[TOPK_CUTS_KEY])
        return state.replace(masks=masks, extra={**state.extra, TOPK_CUTS_KEY: cuts})

    def update(state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
        values, opt_state = apply_optimizer(optimizer, grads, state.opt_state,
                                            trainables(state), **extra_args)
        stepped = with_trainables(state, values).replace(opt_state=opt_state)
        return refresh(advance(stepped))

    def effective_params(state: SparseState) -> PyTree:
        chosen = state.masks
        if binarized:
            kept = {p: binarize(w, m) for (p, w), m in
                    zip(select(state.params).items(), select(chosen).values(), strict=True)}
            return replace(state.params, kept)
        return jax.tree_util.tree_map(
            lambda w, m: jnp.where(m, w, jnp.zeros((), jnp.result_type(w))), state.params, chosen)

    method = Method(name=name, init=init, trainables=trainables, materialize=materialize,
                    update=update, effective_params=effective_params)
    return method._replace(outside=OutsideLoop(
        with_trainables=with_trainables, advance=advance, refresh=refresh,
        trains_weights=train_weights, scores_layout="by_path", reads_step=ramp_steps > 0))


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
