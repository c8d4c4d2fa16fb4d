"""The contract every sparse-training method follows.

A method is a :class:`Method`: a NamedTuple of pure functions over a :class:`SparseState`
(the way optax builds a ``GradientTransformation``). A train step is the same for every
method::

    def train_step(state, batch):
        def objective(trainables):
            params = method.materialize(state, trainables)
            return loss_fn(params, batch) + method.penalty(state, trainables)
        grads = jax.grad(objective)(method.trainables(state))
        return method.update(state, grads)

:func:`sparsejax.harness.training.make_train_step` builds exactly this (with batch statistics,
metrics and data-parallel gradient averaging).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from sparsejax.core.masks import dense_masks
from sparsejax.core.validation import check_grads, check_same_structure

__all__ = [
    "SparseState",
    "Method",
    "OutsideLoop",
    "InitContext",
    "MaskPhases",
    "step_key",
    "no_penalty",
    "masks_in_state",
    "apply_optimizer",
    "count_skipped_step",
]

PyTree = Any


def named_error(name: str, error: ValueError) -> ValueError:
    """``error`` as a ValueError whose message names the method ``name`` once: prefixed
    with ``name: `` unless it already starts with the name.

    >>> str(named_error("snip", ValueError("bad density")))
    'snip: bad density'
    >>> str(named_error("snip", ValueError("snip scores weights on training data")))
    'snip scores weights on training data'
    """
    message = str(error)
    if message.startswith((f"{name}:", f"{name} ")):
        return ValueError(message)
    return ValueError(f"{name}: {message}")


class SparseState(struct.PyTreeNode):
    """Everything a method carries from one step to the next.

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      params: the weights (frozen for strong-ticket methods).
      masks: bool arrays with the structure and shapes of ``params``; leaves that are
        not pruned are all ``True``.
      scores: per-weight trainable variables of score-based methods (Edge-Popup scores,
        gate parameters), else ``{}``.
      opt_state: the optax state of whatever the method trains.
      rng: a ``jax.random.PRNGKey``; per-step keys are ``fold_in(rng, step)``, so every
        device makes the same random decision and a resumed run makes the same ones.
      model_state: non-trainable model collections (batch statistics), never masked.
      extra: method-specific state (for example a recorded rewind point), else ``{}``.
    """

    step: jax.Array
    params: PyTree
    masks: PyTree
    scores: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    model_state: PyTree = struct.field(default_factory=dict)
    extra: PyTree = struct.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        params: PyTree,
        rng: jax.Array,
        opt_state: optax.OptState,
        masks: PyTree | None = None,
        scores: PyTree | None = None,
        model_state: PyTree | None = None,
        extra: PyTree | None = None,
    ) -> SparseState:
        """A state at step 0; ``masks`` default to dense, the others to ``{}``."""
        masks = dense_masks(params) if masks is None else masks
        check_same_structure(params, masks)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            masks=masks,
            scores={} if scores is None else scores,
            opt_state=opt_state,
            rng=jnp.asarray(rng),
            model_state={} if model_state is None else model_state,
            extra={} if extra is None else extra,
        )


class InitContext(NamedTuple):
    """What a method may need from the task at init: pruning-at-initialisation methods
    (SNIP, GraSP) score the weights with the loss on a few training batches.

    Attributes:
      loss_fn: ``(params, model_state, batch) -> (loss, (model_state, metrics))``.
      batches: training batches to score on (the harness passes the first ones of the
        run's own deterministic stream).
      init_params: ``key -> params``, a fresh draw of the model's initial params from
        ``key`` (the model's own initialisers), for methods that score one init and train
        another (``snip(..., fresh_init=True)``); ``None`` where the caller has no model.
    """

    loss_fn: Callable[[Any, Any, Any], Any]
    batches: tuple[Any, ...]
    init_params: Callable[[jax.Array], Any] | None = None


InitFn = Callable[..., SparseState]
"""``init(params, rng, model_state=None, context=None) -> SparseState``; ``context`` is
an :class:`InitContext` for methods that score weights on data, ignored by the others."""
TrainablesFn = Callable[[SparseState], PyTree]
MaterializeFn = Callable[[SparseState, PyTree], PyTree]
UpdateFn = Callable[..., SparseState]
"""``update(state, grads, **extra_args) -> SparseState``; ``extra_args`` (optax's extra
arguments, such as ``reduce_on_plateau``'s ``value``) reach the optimizer the method
wraps."""
EffectiveParamsFn = Callable[[SparseState], PyTree]
HardMasksFn = Callable[[SparseState], PyTree]
MaskedParamsFn = Callable[[SparseState, PyTree], PyTree]
PenaltyFn = Callable[[SparseState, PyTree], jax.Array]


class MaskPhases(NamedTuple):
    """The update of a method whose masks move only after steps known in advance (dynamic
    sparse training every N steps, scheduled pruning), split in two.

    ``Method.update`` is one traced function that decides with ``lax.cond`` on
    ``state.step``, so it composes with any research code. The library's trainers
    instead compile ``train`` and ``move`` apart and pick one on the host from ``due``:
    a step without a mask update then carries no untaken branch, which on CPU cost
    4-11% of a LeNet-300-100 step by itself. All three give the same states.

    Attributes:
      due: ``steps_done -> bool`` on the host: does the update that brings the step
        counter to ``steps_done`` move the masks?
      train: the update of the other steps (``due`` false).
      move: the update of those steps (``due`` true).
    """

    due: Callable[[int], bool]
    train: UpdateFn
    move: UpdateFn


def params_as_they_are(state: SparseState, trainables: PyTree) -> PyTree:
    """The ``materialize`` of methods whose params already are the effective weights: dense
    training, and masked methods that keep pruned weights exactly zero in ``state.params``
    (init zeroes them; ``chain(mask_gradients(), optimizer, keep_pruned_zero())`` keeps
    them zero). Masking again in the forward pass would change nothing but the step time;
    such a method gets masked gradients from ``mask_gradients`` (the gradients of
    ``w * m``) or, for dynamic sparse training, wants the dense gradient anyway.
    """
    del state
    return trainables


def masks_in_state(state: SparseState) -> PyTree:
    """The ``hard_masks`` of methods that keep their hard masks current: ``state.masks``."""
    return state.masks


def no_penalty(state: SparseState, trainables: PyTree) -> jax.Array:
    """The penalty of methods without one: zero."""
    del state, trainables
    return jnp.zeros((), jnp.float32)


class OutsideLoop(NamedTuple):
    """The pieces of a score method's ``update`` that do not run the optimizer.

    Attributes:
      with_trainables: ``(state, trainables) -> state`` with ``trainables`` (the shape of
        ``method.trainables(state)``) in place of the state's own.
      advance: ``state -> state`` after an outside optimizer step: ``step + 1`` and the
        method's bookkeeping (the gates clip their parameters and run the controller).
      refresh: ``state -> state`` whose masks (and top-k cuts) are those of its trainables
        at ``state.step``; the identity for methods whose forward reads no mask.
      trains_weights: whether the method trains the weights too (``supermask_weights``).
      scores_layout: ``'by_path'`` (``state.scores`` is ``{leaf path: scores}`` over the
        prunable leaves) or ``'like_params'`` (the params' structure, an empty ``(0,)``
        array for a leaf without scores).
      reads_step: whether the training forward or the penalty depend on ``state.step``
        (the gates' noise, a density ramp), so a loop must count the steps.
    """

    with_trainables: Callable[[SparseState, PyTree], SparseState]
    advance: Callable[[SparseState], SparseState]
    refresh: Callable[[SparseState], SparseState]
    trains_weights: bool
    scores_layout: Literal["by_path", "like_params"]
    reads_step: bool


class _MethodFields(NamedTuple):
    """The fields of :class:`Method` (documented there)."""

    name: str
    init: InitFn
    trainables: TrainablesFn
    materialize: MaterializeFn
    update: UpdateFn
    effective_params: EffectiveParamsFn
    penalty: PenaltyFn = no_penalty
    phases: MaskPhases | None = None
    hard_masks: HardMasksFn = masks_in_state
    masked_params: MaskedParamsFn | None = None
    outside: OutsideLoop | None = None
    dense_weights: bool = False
    relaxed_forward: bool = False

    def params_with_masks(self, state: SparseState, masks: PyTree) -> PyTree:
        """``effective_params(state)`` with ``masks`` as the hard masks.

        >>> import jax, jax.numpy as jnp, optax
        >>> from sparsejax.methods import static
        >>> method = static(optax.sgd(0.1), sparsity=0.5)
        >>> state = method.init({"w": jnp.ones(4)}, jax.random.PRNGKey(0))
        >>> method.params_with_masks(state, {"w": jnp.array([True, False, True, False])})
        {'w': Array([1., 0., 1., 0.], dtype=float32)}
        """
        if self.masked_params is not None:
            return self.masked_params(state, masks)
        return self.effective_params(state.replace(masks=masks))


class Method(_MethodFields):
    """A sparse-training method as pure functions.

    Attributes:
      name: the registry name, e.g. ``'dense'``.
      init: ``(params, rng, model_state=None, context=None) -> SparseState``.
      trainables: what ``jax.grad`` differentiates (params, scores, or both).
      materialize: ``(state, trainables) -> params`` the effective params used in the
        training forward pass; differentiable in ``trainables``.
      update: ``(state, grads, **extra_args) -> state``, pure; ``grads`` match
        ``trainables(state)``. It increments ``state.step``. Keyword arguments are optax's
        extra arguments (``reduce_on_plateau``'s ``value``): they reach the optimizer
        the method wraps, as in ``optax.GradientTransformationExtraArgs``.
      effective_params: ``state -> params`` used for evaluation and export: the hard
        binary mask applied to the weights, no noise.
      penalty: ``(state, trainables) -> scalar`` added to the loss (e.g. an L0 penalty).
      phases: for methods whose masks move on a schedule, ``update`` split by that
        schedule (:class:`MaskPhases`), which the trainers use; else ``None``.
      hard_masks: ``state -> masks``, the binary masks ``effective_params`` applies:
        ``state.masks`` (the default) for the methods that keep them current in the
        state; the gates derive theirs from the gate parameters when asked (a global
        top-k that no training step needs).
      masked_params: ``(state, masks) -> params``, ``effective_params`` with ``masks`` in
        place of ``hard_masks(state)`` (a ticket rebuilds its weights so); ``None`` (the
        default) sets ``state.masks``. Call it through :meth:`params_with_masks`.
      outside: for score methods, the pieces a loop outside the method runs
        (:class:`OutsideLoop`); else ``None``.
      dense_weights: ``True`` for methods that train every weight and mask them in the
        forward pass (``materialize``; the straight-through methods): the pruned entries
        of ``state.params`` keep their trained values. ``False`` (the default): they are
        exactly zero, and ``materialize`` may use the params as they are.
      relaxed_forward: ``True`` for methods whose training forward pass is not the
        network they evaluate (the gates' relaxed, noisy gates): what the model gathers
        in training, such as batch norm's running averages, describes another network
        (the harness recomputes them, :mod:`sparsejax.harness.training.batch_norm`).
        ``False`` (the default): training runs the evaluated masks.

    Constructing a ``Method`` wraps ``update`` and both ``phases`` so that, while they
    are traced, they check that ``grads`` has the structure and leaf shapes of
    ``trainables(state)`` and raise a ``ValueError`` naming the differing leaf paths
    (:func:`sparsejax.core.validation.check_grads`); a jitted step pays nothing for it.
    ``_replace`` does not wrap again: give it functions that call a method's own. Called
    eagerly (on concrete arrays), the wrapped functions run compiled, once per shapes and
    dtypes of the method object; traced, they are part of the caller's program.
    """

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Method:
        method = super().__new__(cls, *args, **kwargs)
        phases = method.phases
        if phases is not None:
            phases = phases._replace(train=checking_grads(phases.train, method.trainables),
                                     move=checking_grads(phases.move, method.trainables))
        return method._replace(update=checking_grads(method.update, method.trainables),
                               phases=phases)


def checking_grads(update: UpdateFn, trainables: TrainablesFn) -> UpdateFn:
    """``update`` that first checks, at trace time, that ``grads`` match
    ``trainables(state)`` (:func:`sparsejax.core.validation.check_grads`). :class:`Method`
    applies it to every update it is built with, so that a method cannot skip it; an
    update already checked against the same ``trainables`` is returned as it is.

    >>> import jax.numpy as jnp
    >>> update = checking_grads(lambda state, grads: state, lambda state: state)
    >>> update({"w": jnp.ones(2)}, {"v": jnp.ones(2)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: grads do not match trainables: missing leaves ['w']; unexpected leaves ['v'] ...
    """
    if getattr(update, _CHECKED_AGAINST, None) is trainables:
        return update
    # An eager call (research code, debugging) runs the update compiled once per shapes,
    # not op by op: its branches (a lax.cond built from fresh closures) would otherwise be
    # traced and compiled again on every call. Traced calls (a user's jit, vmap, grad)
    # inline the update into their own program as before.
    compiled = jax.jit(update)

    @functools.wraps(update)
    def checked(state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
        check_grads(trainables(state), grads)
        if any(isinstance(leaf, jax.core.Tracer)
               for leaf in jax.tree_util.tree_leaves((state, grads, extra_args))):
            return update(state, grads, **extra_args)
        return compiled(state, grads, **extra_args)

    setattr(checked, _CHECKED_AGAINST, trainables)
    return checked


_CHECKED_AGAINST = "_sparsejax_grads_checked_against"


def step_key(state: SparseState, salt: int = 0) -> jax.Array:
    """The PRNG key of the current step, the same on every device and on resume."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), salt)


def apply_optimizer(
    optimizer: optax.GradientTransformation,
    grads: PyTree,
    opt_state: optax.OptState,
    values: PyTree,
    **extra_args: Any,
) -> tuple[PyTree, optax.OptState]:
    """One optax step on ``values``: returns ``(new_values, new_opt_state)``.

    Extra keyword arguments (e.g. ``masks=``) reach ``GradientTransformationExtraArgs``.
    """
    if extra_args and not isinstance(optimizer, optax.GradientTransformationExtraArgs):
        optimizer = optax.with_extra_args_support(optimizer)
    updates, opt_state = optimizer.update(grads, opt_state, values, **extra_args)
    return optax.apply_updates(values, updates), opt_state


def count_skipped_step(opt_state: optax.OptState) -> optax.OptState:
    """``opt_state`` after a step on which the method did not run its optimizer (RigL's
    mask-update steps): every step counter in it (each ``count`` field of its state
    tuples, as ``optax.tree_utils.tree_get_all_with_path(opt_state, 'count')`` finds them:
    schedules, ``inject_hyperparams``, Adam's bias correction) advances by one and
    nothing else moves, so a schedule inside the wrapped optimizer follows the training
    step rather than the number of optimizer steps.

    >>> import jax.numpy as jnp, optax
    >>> opt = optax.inject_hyperparams(optax.sgd)(
    ...     learning_rate=optax.linear_schedule(1.0, 0.0, 10), momentum=0.9)
    >>> state = count_skipped_step(opt.init({"w": jnp.ones(2)}))
    >>> [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state, "count")]
    [1, 1]
    """
    def advance(path: tuple[Any, ...], leaf: Any) -> Any:
        field = path[-1] if path else None
        if isinstance(field, jax.tree_util.GetAttrKey) and field.name == "count":
            return optax.safe_increment(leaf)  # optax's own counters saturate, not wrap
        return leaf

    return jax.tree_util.tree_map_with_path(advance, opt_state)
