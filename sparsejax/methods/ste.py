"""Straight-through weight sparsity: every weight trains, the forward pass uses them masked.

* ``ste_magnitude``: the masks keep the largest ``|w|`` of the current weights
  (JaxPruner's ``magnitude_ste``, Bengio et al. 2013's straight-through estimator).
* ``ste_random``: a fresh uniformly random mask at every mask update (JaxPruner's
  ``random_ste``).
* ``sr_ste``: ``ste_magnitude`` plus the sparse-refined term of Zhou et al. (ICLR 2021,
  "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch"): the
  gradient of every weight the mask drops gets ``decay * w`` added, so pruned weights
  decay instead of hovering at the cut. Usually with an N:M pattern (``pattern="2:4"``).

The forward pass is ``ste_mask(w, mask)``: ``w`` where the mask keeps it, zero elsewhere,
and the gradient of every weight, kept or not, is the gradient at the masked weights (the
straight-through estimate; :func:`sparsejax.ste_mask`). Nothing is pruned for good:
``state.params`` holds the dense weights (``Method.dense_weights``), and the masks are
chosen again from them after every ``update_every``-th update, so ``state.masks`` are
always those of the weights the next forward pass uses. Evaluation, export and tickets
use ``effective_params``: the weights with the pruned entries at zero, exactly the
target counts.

Masks are chosen with the one selection step of the library (a distribution over the
layers, ``'global'`` included, any pattern: :func:`sparsejax.select_masks`), at the
sparsity of the step: constant by default, or Zhu & Gupta's cubic ramp from
``initial_sparsity`` at ``begin_step`` to ``sparsity`` at ``end_step``. A top-k every
step starts its search from the last cuts (:func:`sparsejax.topk_mask_tracked`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern, method_pattern
from sparsejax.core.schedules import cubic_sparsity
from sparsejax.core.ste import ste_mask
from sparsejax.core.transforms import zero_masked
from sparsejax.core.validation import check_int, check_sparsity
from sparsejax.methods.base import (
    InitContext,
    Method,
    SparseState,
    apply_optimizer,
    named_error,
)
from sparsejax.methods.draws import UniformDraw, draws_per_leaf
from sparsejax.methods.phases import branch, scheduled_update
from sparsejax.methods.pruning_tables import schedule_table
from sparsejax.methods.registry import register_method

__all__ = ["SR_STE_DECAY", "SteSettings", "straight_through", "ste_magnitude", "ste_random",
           "sr_ste", "sparse_refined_gradients"]

PyTree = Any

SR_STE_DECAY = 2e-4
"""SR-STE's ``lambda_w``: the reference code's default (``decay = 0.0002`` in
``Sparse.forward`` of NM-sparsity/NM-sparsity's ``devkit/sparse_ops/sparse_ops.py``),
which its backward adds as ``decay * (1 - mask) * weight``."""

CUTS_KEY = "topk_cuts"
_RANDOM_SALT = 0x73746572


class SteSettings(NamedTuple):
    """The checked options of :func:`straight_through` (documented there)."""

    name: str
    sparsity: float
    scores: str
    distribution: str
    pattern: Pattern
    begin_step: int
    end_step: int | None
    initial_sparsity: float
    update_every: int
    decay: float
    prunable: Prunable
    overrides: Mapping[str, float] | None

    def densities(self) -> list[float]:
        """Density of mask update ``j`` (after the update that reaches step
        ``j * update_every``); the last entry holds from then on."""
        if self.end_step is None:
            return [1.0 - self.sparsity]
        ramp = cubic_sparsity(self.sparsity, self.begin_step, self.end_step,
                              initial_sparsity=self.initial_sparsity)
        last = math.ceil(self.end_step / self.update_every)
        with jax.ensure_compile_time_eval():  # one call for every step, on the host
            values = np.asarray(ramp(np.arange(last) * self.update_every), np.float64)
        return [1.0 - float(v) for v in values] + [1.0 - self.sparsity]

    def due(self, steps_done: jax.Array | int) -> jax.Array | bool:
        """Does the update that reaches ``steps_done`` choose new masks?"""
        if self.update_every == 1:
            return True
        return steps_done % self.update_every == 0


def sparse_refined_gradients(grads: PyTree, params: PyTree, masks: PyTree,
                             decay: float) -> PyTree:
    """SR-STE's gradients: ``grads + decay * (1 - masks) * params``, the reference code's
    backward (the pruned weights decay towards zero, the kept ones are untouched).

    >>> import jax.numpy as jnp
    >>> sparse_refined_gradients({"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, -5.0])},
    ...                          {"w": jnp.array([True, False])}, 0.5)["w"]
    Array([ 1. , -1.5], dtype=float32)
    """
    return jax.tree_util.tree_map(
        lambda g, w, m: g + jnp.where(m, jnp.zeros((), w.dtype), decay * w).astype(g.dtype),
        grads, params, masks)


class _Selection:
    """The masks of a straight-through method: a table of kept counts per density, built
    on the host from the params' shapes once per shapes, then an exact top-k with a
    traced row under ``jit``."""

    def __init__(self, settings: SteSettings) -> None:
        self.settings = settings
        self.densities = settings.densities()
        self.tables: dict[str, Any] = {}

    def table(self, params: PyTree) -> Any:
        shapes = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p),
                                                                       jnp.result_type(p)),
                                        params)
        key = str(shapes)
        if key not in self.tables:
            s = self.settings
            try:
                self.tables[key] = schedule_table(shapes, self.densities, s.distribution,
                                                  s.pattern, s.prunable, s.overrides)
            except ValueError as error:
                raise named_error(s.name, error) from None
        return self.tables[key]

    def scores(self, params: PyTree, rng: jax.Array, step: jax.Array) -> PyTree:
        if self.settings.scores == "magnitude":
            return params  # ranked by |w| inside the search
        leaves, treedef = jax.tree_util.tree_flatten(params)
        key = jax.random.fold_in(jax.random.fold_in(rng, _RANDOM_SALT), step)
        draws = draws_per_leaf(key, [jnp.shape(p) for p in leaves], UniformDraw())
        return jax.tree_util.tree_unflatten(treedef, draws)

    def masks(self, params: PyTree, rng: jax.Array, step: jax.Array,
              cuts: jax.Array | None) -> tuple[PyTree, jax.Array]:
        """``(masks, cuts)`` of ``params`` at ``step``."""
        table = self.table(params)
        scores = self.scores(params, rng, step)
        last = len(self.densities) - 1
        row = jnp.minimum(step // self.settings.update_every, last) if last else 0
        if self.settings.pattern.ranks_globally:  # single weights: the tracked search
            return table.select_tracked(scores, row, cuts, by_magnitude=True)
        if self.settings.scores == "magnitude":
            scores = jax.tree_util.tree_map(jnp.abs, scores)
        found = table.select(scores, row)
        return found, jnp.zeros((0, 2), jnp.float32) if cuts is None else cuts


def straight_through(
    optimizer: optax.GradientTransformation, *, sparsity: float, scores: str = "magnitude",
    distribution: str = "uniform", pattern: str | Pattern = "unstructured",
    begin_step: int = 0, end_step: int | None = None, initial_sparsity: float = 0.0,
    update_every: int = 1, decay: float = 0.0, prunable: Prunable = default_prunable,
    overrides: Mapping[str, float] | None = None, name: str = "ste_magnitude",
) -> Method:
    """A straight-through method: train every weight with ``optimizer``; the forward pass
    uses the weights under masks chosen by ``scores`` (``'magnitude'``: the largest
    ``|w|``; ``'random'``: uniformly at random) after every ``update_every``-th update.

    Args:
      sparsity: the target fraction of prunable weights at zero in the forward pass.
      distribution: how the density is shared between layers (``'uniform'``, ``'erk'``,
        ``'erdos_renyi'``, or ``'global'``: one ranking across the layers).
      pattern: which sets of weights a mask may keep (``'2:4'``, ``'block:4'``,
        ``'channel'``; :mod:`sparsejax.core.patterns`); N:M fixes ``sparsity`` at
        ``1 - N / M``.
      begin_step, end_step, initial_sparsity: with ``end_step``, the sparsity follows the
        cubic ramp (:func:`sparsejax.cubic_sparsity`) from ``initial_sparsity`` at
        ``begin_step`` to ``sparsity`` at ``end_step`` (reached at the first mask update
        at or after it; with N:M, ``num_kept(density, M)`` of every group); without it
        the sparsity is ``sparsity`` from the first step.
      update_every: steps between mask choices (1: every step, as in the papers).
      decay: SR-STE's ``lambda_w`` (0: plain STE).
    """
    check_sparsity(sparsity)
    check_sparsity(initial_sparsity, "initial_sparsity")
    check_int(update_every, "update_every (steps)", minimum=1)
    check_int(begin_step, "begin_step", minimum=0)
    if scores not in ("magnitude", "random"):
        raise ValueError(f"{name}: scores must be 'magnitude' or 'random', got {scores!r}")
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay >= 0):
        raise ValueError(f"{name}: decay must be a finite number >= 0, got {decay!r}")
    if end_step is not None:
        check_int(end_step, "end_step", minimum=1)
        if not begin_step < end_step:
            raise ValueError(f"{name}: need begin_step < end_step, got {begin_step}, "
                             f"{end_step}")
    pattern = method_pattern(pattern, sparsity, name)
    settings = SteSettings(name, float(sparsity), scores, distribution, pattern, begin_step,
                           end_step, float(initial_sparsity), update_every, float(decay),
                           prunable, overrides)
    selection = _Selection(settings)

    def init(params: PyTree, rng: jax.Array, model_state: PyTree = None,
             context: InitContext | None = None) -> SparseState:
        del context
        masks, cuts = selection.masks(params, rng, jnp.zeros((), jnp.int32), None)
        return SparseState.create(params=params, masks=masks, rng=rng,
                                  opt_state=optimizer.init(params), model_state=model_state,
                                  extra={CUTS_KEY: cuts})

    def update_with(state: SparseState, grads: PyTree, due: jax.Array | bool,
                    **extra_args: Any) -> SparseState:
        if settings.decay:
            grads = sparse_refined_gradients(grads, state.params, state.masks, settings.decay)
        params, opt_state = apply_optimizer(optimizer, grads, state.opt_state, state.params,
                                            **extra_args)
        step = state.step + 1
        masks, cuts = branch(
            due, lambda: selection.masks(params, state.rng, step, state.extra[CUTS_KEY]),
            lambda: (state.masks, state.extra[CUTS_KEY]))
        return state.replace(step=step, params=params, masks=masks, opt_state=opt_state,
                             extra={**state.extra, CUTS_KEY: cuts})

    update, phases = scheduled_update(update_with, settings.due)
    return Method(
        name=name,
        init=init,
        trainables=lambda state: state.params,
        materialize=lambda state, params: ste_mask(params, state.masks),
        update=update,
        effective_params=lambda state: zero_masked(state.params, state.masks),
        phases=None if update_every == 1 else phases,
        dense_weights=True,
    )


def ste_magnitude(optimizer: optax.GradientTransformation, *, sparsity: float,
                  distribution: str = "uniform", pattern: str | Pattern = "unstructured",
                  begin_step: int = 0, end_step: int | None = None,
                  initial_sparsity: float = 0.0, update_every: int = 1,
                  prunable: Prunable = default_prunable,
                  overrides: Mapping[str, float] | None = None) -> Method:
    """Straight-through magnitude sparsity (Bengio et al. 2013's estimator; JaxPruner's
    ``magnitude_ste``): every step the forward pass keeps the largest ``|w|`` of the
    current weights, and the gradient reaches every weight (:func:`straight_through`,
    whose options these are).

    >>> import jax, jax.numpy as jnp, optax
    >>> m = ste_magnitude(optax.sgd(1.0), sparsity=0.5)
    >>> s = m.init({"w": jnp.array([[3.0, -1.0], [0.5, 2.0]])}, jax.random.PRNGKey(0))
    >>> s.masks["w"]
    Array([[ True, False],
           [False,  True]], dtype=bool)
    >>> s = m.update(s, {"w": jnp.array([[0.0, -5.0], [0.0, 0.0]])})  # a pruned weight
    >>> s.params["w"][0, 1], s.masks["w"][0, 1]   # trained, and back in the mask
    (Array(4., dtype=float32), Array(True, dtype=bool))
    """
    return straight_through(optimizer, sparsity=sparsity, scores="magnitude",
                            distribution=distribution, pattern=pattern,
                            begin_step=begin_step, end_step=end_step,
                            initial_sparsity=initial_sparsity, update_every=update_every,
                            prunable=prunable, overrides=overrides, name="ste_magnitude")


def ste_random(optimizer: optax.GradientTransformation, *, sparsity: float,
               distribution: str = "uniform", pattern: str | Pattern = "unstructured",
               begin_step: int = 0, end_step: int | None = None,
               initial_sparsity: float = 0.0, update_every: int = 1,
               prunable: Prunable = default_prunable,
               overrides: Mapping[str, float] | None = None) -> Method:
    """Straight-through random sparsity (JaxPruner's ``random_ste``): every mask update
    draws a new uniformly random mask (from ``fold_in(rng, step)``: the same on every
    device and on resume); the gradient reaches every weight.

    >>> import jax, jax.numpy as jnp, optax
    >>> m = ste_random(optax.sgd(0.1), sparsity=0.75)
    >>> s = m.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0))
    >>> int(s.masks["w"].sum()), int(m.update(s, {"w": jnp.ones((4, 4))}).masks["w"].sum())
    (4, 4)
    """
    return straight_through(optimizer, sparsity=sparsity, scores="random",
                            distribution=distribution, pattern=pattern,
                            begin_step=begin_step, end_step=end_step,
                            initial_sparsity=initial_sparsity, update_every=update_every,
                            prunable=prunable, overrides=overrides, name="ste_random")


def sr_ste(optimizer: optax.GradientTransformation, *, sparsity: float,
           pattern: str | Pattern = "unstructured", decay: float = SR_STE_DECAY,
           distribution: str = "uniform", begin_step: int = 0, end_step: int | None = None,
           initial_sparsity: float = 0.0, update_every: int = 1,
           prunable: Prunable = default_prunable,
           overrides: Mapping[str, float] | None = None) -> Method:
    """SR-STE (Zhou et al. 2021, ICLR): straight-through magnitude sparsity whose pruned
    weights get ``decay * w`` added to their gradient (:data:`SR_STE_DECAY`, the
    reference code's ``2e-4``). The paper trains N:M from scratch: ``pattern="2:4"``
    with ``sparsity=0.5``.

    >>> import jax, jax.numpy as jnp, optax
    >>> m = sr_ste(optax.sgd(1.0), sparsity=0.5, pattern="2:4", decay=0.5)
    >>> s = m.init({"w": jnp.array([[4.0], [-3.0], [2.0], [1.0]])}, jax.random.PRNGKey(0))
    >>> m.update(s, {"w": jnp.zeros((4, 1))}).params["w"].ravel()  # pruned: w - 0.5 w
    Array([ 4. , -3. ,  1. ,  0.5], dtype=float32)
    """
    return straight_through(optimizer, sparsity=sparsity, scores="magnitude",
                            distribution=distribution, pattern=pattern,
                            begin_step=begin_step, end_step=end_step,
                            initial_sparsity=initial_sparsity, update_every=update_every,
                            decay=decay, prunable=prunable, overrides=overrides,
                            name="sr_ste")


register_method("ste_magnitude", ste_magnitude)
register_method("ste_random", ste_random)
register_method("sr_ste", sr_ste)
