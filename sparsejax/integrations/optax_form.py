"""Every method that trains weights as an ``optax.GradientTransformation``.

:func:`sparse_tx` wraps the user's optimizer in a method (RigL, static ERK, gradual
magnitude pruning, SNIP, ...) and returns a transformation that drops into the user's own
loop: ``TrainState.create(tx=...)`` and ``apply_gradients``, ``nnx.Optimizer(model, tx,
wrt=nnx.Param)``, ``optax.chain``, ``optax.multi_transform``, ``optax.masked``,
``optax.inject_hyperparams`` and ``optax.MultiSteps``.

It is the native :class:`~sparsejax.Method` seen from optax, not a second copy: ``init``
runs ``method.init`` and ``update`` runs ``method.update`` on a
:class:`~sparsejax.SparseState` assembled from the user's params and the transformation's
state, then returns ``new_params - params`` as the updates. So both forms make the same
mask decisions from the same rule functions. Pruned weights leave
``optax.apply_updates`` at exactly zero (``p + (0 - p) == 0``), and the gradients the
method sees are those of the user's loss at weights whose pruned entries are zero: the
dense gradient RigL grows by and SNFS averages.

>>> import jax, jax.numpy as jnp, optax, sparsejax
>>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
>>> tx = sparsejax.sparse_tx("magnitude", optax.sgd(0.1), sparsity=0.5)
>>> opt_state = tx.init(params)
>>> params = sparsejax.zero_pruned(params, opt_state)  # start from the masked weights
>>> updates, opt_state = tx.update({"w": jnp.ones((2, 4))}, opt_state, params)
>>> optax.apply_updates(params, updates)["w"]
Array([[0. , 0. , 0. , 0. ],
       [4.9, 5.9, 6.9, 7.9]], dtype=float32)
>>> int(sparsejax.masks_of(opt_state)["w"].sum())
4
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax.core.ste import ste_mask
from sparsejax.core.transforms import zero_masked
from sparsejax.core.validation import as_key, check_binary_masks, check_same_structure
from sparsejax.integrations.zero_check import (
    ZeroCheck,
    checked,
    fresh_check,
    raise_if_escaped,
    warn_if_followed,
)
from sparsejax.methods.base import InitContext, Method, SparseState
from sparsejax.methods.registry import get_method

__all__ = ["SparseTxState", "ZeroCheck", "as_optax", "sparse_tx", "masks_of",
           "replace_masks", "zero_pruned", "forward_params"]

PyTree = Any


class SparseTxState(NamedTuple):
    """The state of :func:`sparse_tx`: everything of the method's
    :class:`~sparsejax.SparseState` except the params, which the user's loop holds.

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      masks: bool arrays with the structure of the params (read them with
        :func:`masks_of`; replace them with :func:`replace_masks`).
      inner_state: the state of the wrapped optimizer (inside the method's masking chain).
      rng: the method's PRNG key; per-step keys are ``fold_in(rng, step)``.
      extra: what the method carries besides (SNFS's moving average of the gradients).
      zero_check: whether pruned weights were found non-zero in the params of an update
        (:class:`ZeroCheck`); :func:`masks_of` refuses to report masks the params escaped.
        ``None`` for the straight-through methods (``Method.dense_weights``), whose
        params keep every weight and whose forward pass masks them
        (:func:`forward_params`).
    """

    step: jax.Array
    masks: PyTree
    inner_state: optax.OptState
    rng: jax.Array
    extra: PyTree
    zero_check: ZeroCheck


def _pure(tree: PyTree) -> PyTree:
    """``tree`` with Flax NNX variables replaced by their values (``nnx.Optimizer`` hands
    ``init`` a state of variables and ``update`` plain arrays)."""
    from flax import nnx

    as_pure = getattr(nnx, "as_pure", None) or nnx.pure  # flax < 0.12.7 names it nnx.pure
    return as_pure(tree)


def _score_method_error(name: str) -> ValueError:
    return ValueError(
        f"sparse_tx wraps methods that train the weights; {name!r} trains scores beside "
        "frozen weights: use sparsejax.nnx.sparsify (Flax NNX) or sparsejax.linen.sparsify "
        "(a linen TrainState) for it")


def as_optax(
    method: Method,
    *,
    seed: int | jax.Array = 0,
    context: InitContext | None = None,
    model_state: PyTree = None,
) -> optax.GradientTransformationExtraArgs:
    """The optax form of ``method``, a method that trains the weights.

    Args:
      method: a :class:`~sparsejax.Method` whose trainables are the params (dense,
        static, the pruning methods, SET, RigL, SNFS). Score methods train scores beside
        frozen weights: use :mod:`sparsejax.nnx` or :mod:`sparsejax.linen` for those.
      seed: an int or a PRNG key; the method's random decisions (the static mask, SET's
        regrowth, RigL's tie noise) follow from it, as ``method.init(params, key)``.
      context: the data of methods that score weights at init (SNIP, GraSP):
        ``InitContext(loss_fn, batches)``.
      model_state: batch statistics, if the scores at init need them.

    >>> import jax, jax.numpy as jnp, optax, sparsejax
    >>> tx = sparsejax.as_optax(sparsejax.static(optax.sgd(0.1), sparsity=0.75,
    ...                                          distribution="uniform"), seed=0)
    >>> opt_state = tx.init({"w": jnp.ones((4, 4))})
    >>> int(sparsejax.masks_of(opt_state)["w"].sum())
    4
    """
    rng = as_key(seed, "seed")

    if method.outside is not None:  # a score method: sparsejax.nnx / sparsejax.linen serve it
        raise _score_method_error(method.name)

    def init_fn(params: PyTree) -> SparseTxState:
        params = _pure(params)
        state = method.init(params, rng, model_state, context)
        if jax.tree_util.tree_leaves(state.scores):
            raise _score_method_error(method.name)
        # Straight-through methods keep the pruned weights' values: nothing to check.
        check = None if method.dense_weights else fresh_check()
        return SparseTxState(step=state.step, masks=state.masks, inner_state=state.opt_state,
                             rng=state.rng, extra=state.extra, zero_check=check)

    def update_fn(updates: PyTree, state: SparseTxState, params: PyTree | None = None,
                  **extra_args: Any) -> tuple[PyTree, SparseTxState]:
        if params is None:
            raise ValueError(
                f"the optax form of {method.name!r} needs the params: call "
                "tx.update(grads, opt_state, params)")
        if not isinstance(state, SparseTxState):
            raise ValueError(
                f"sparse_tx({method.name!r}).update was given {type(state).__name__}, not "
                "the state its init returned: call opt_state = tx.init(params) with this "
                "transformation first")
        if "masks" in extra_args:
            raise ValueError("sparse_tx passes optax's extra arguments to the optimizer it "
                             "wraps; 'masks' is the one its masking transforms take: give "
                             "the masks with sparsejax.replace_masks instead")
        if any(isinstance(leaf, jax.core.Tracer)
               for leaf in jax.tree_util.tree_leaves((updates, state, params, extra_args))):
            return traced_update(updates, state, params, extra_args)
        # Called eagerly (research code, debugging): compiled once per shapes, not op by
        # op, whose fresh closures (the check's lax.cond) would compile on every call.
        return compiled_update(updates, state, params, extra_args)

    def traced_update(updates: PyTree, state: SparseTxState, params: PyTree,
                      extra_args: dict[str, Any]) -> tuple[PyTree, SparseTxState]:
        # The method runs on the params as they are: with zero_pruned before the first
        # step their pruned entries are zero already, and masking them on the way in
        # would make a copy wherever a mask decision (a lax.cond) reads them.
        sparse = SparseState(step=state.step, params=params, masks=state.masks, scores={},
                             opt_state=state.inner_state, rng=state.rng, model_state={},
                             extra=state.extra)
        new = method.update(sparse, updates, **extra_args)
        if method.dense_weights:  # every weight trains; the forward pass masks them
            deltas = jax.tree_util.tree_map(lambda new_p, p: (new_p - p).astype(p.dtype),
                                            new.params, params)
            return deltas, SparseTxState(step=new.step, masks=new.masks,
                                         inner_state=new.opt_state, rng=new.rng,
                                         extra=new.extra, zero_check=None)
        # Whether this update moves the masks (methods without phases never do after init).
        moves = method.phases.due(state.step + 1) if method.phases is not None else False
        # Masked on the way out (fused with the difference), so pruned entries leave
        # apply_updates at exactly zero: p + (0 - p) == 0, also in a first step taken
        # without zero_pruned or after replace_masks.
        deltas = jax.tree_util.tree_map(
            lambda new_p, m, p: (jnp.where(m, new_p, jnp.zeros((), new_p.dtype)) - p
                                 ).astype(p.dtype), new.params, new.masks, params)
        return deltas, SparseTxState(step=new.step, masks=new.masks,
                                     inner_state=new.opt_state, rng=new.rng, extra=new.extra,
                                     zero_check=checked(state, params, moves))

    compiled_update = jax.jit(traced_update)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sparse_tx(
    method: str | Method,
    optimizer: optax.GradientTransformation | None = None,
    *,
    seed: int | jax.Array = 0,
    context: InitContext | None = None,
    model_state: PyTree = None,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``optimizer`` in the sparse-training method ``method`` (a registered name such
    as ``'rigl'``, built with ``options``; or a built :class:`~sparsejax.Method`, then
    without ``optimizer``) and return it as an optax transformation (:func:`as_optax`).

    >>> import jax, jax.numpy as jnp, optax, sparsejax
    >>> tx = sparsejax.sparse_tx("rigl", optax.sgd(0.1, momentum=0.9), sparsity=0.75,
    ...                          update_every=1, end_step=10, distribution="uniform")
    >>> params = {"w": jnp.ones((4, 4))}
    >>> opt_state = tx.init(params)
    >>> params = sparsejax.zero_pruned(params, opt_state)
    >>> updates, opt_state = tx.update({"w": jnp.arange(16.0).reshape(4, 4)}, opt_state,
    ...                                params)
    >>> masks = sparsejax.masks_of(opt_state)
    >>> int(masks["w"].sum()), bool(masks["w"][3, 3])  # the largest gradient grew
    (4, True)
    """
    if isinstance(method, Method):
        if optimizer is not None or options:
            raise ValueError("sparse_tx(method) takes a built Method alone: its optimizer "
                             "and options were given when it was built")
        built = method
    else:
        if optimizer is None:
            raise ValueError(f"sparse_tx({method!r}, optimizer, ...) needs the optimizer to "
                             "wrap, e.g. optax.sgd(0.1, momentum=0.9)")
        built = get_method(method, optimizer, **options)
    return as_optax(built, seed=seed, context=context, model_state=model_state)


def _is_tx_state(x: Any) -> bool:
    return isinstance(x, SparseTxState)


def _find_states(opt_state: PyTree) -> list[SparseTxState]:
    found = [x for x in jax.tree_util.tree_leaves(_pure(opt_state), is_leaf=_is_tx_state)
             if _is_tx_state(x)]
    if not found:
        raise ValueError("this optimizer state holds no sparse_tx state: build the optimizer "
                         "with sparsejax.sparse_tx (anywhere inside a chain is fine)")
    return found


def _masks(opt_state: PyTree) -> PyTree:
    """The masks of the sparse_tx states in ``opt_state``, in their own structure (an
    ``nnx.State`` for an ``nnx.Optimizer``), merged over several."""
    states = _find_states(opt_state)
    if len(states) == 1:
        return states[0].masks

    def merge(*leaves: Any) -> Any:
        real = [x for x in leaves if not isinstance(x, optax.MaskedNode)]
        return real[0] if real else leaves[0]

    return jax.tree_util.tree_map(merge, *[s.masks for s in states],
                                  is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def masks_of(opt_state: PyTree) -> PyTree:
    """The masks held by the :func:`sparse_tx` state inside ``opt_state`` (an optimizer
    state of any nesting: a chain, ``multi_transform``, ``MultiSteps``, a ``TrainState``'s
    ``opt_state`` or an ``nnx.Optimizer``'s), nested like the params: a dict as the params
    of a linen ``TrainState``, and for an ``nnx.Optimizer`` the nested dict of
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``. With several sparse
    transformations (say, one per ``multi_transform`` group) the masks of each are merged,
    each group's leaves from its own; leaves that no sparse transformation holds are
    ``optax.MaskedNode``.

    Raises ``ValueError`` if an update found pruned weights non-zero in its params
    (:class:`ZeroCheck`): the masks would then report a sparsity the params do not have.

    >>> import jax.numpy as jnp, optax, sparsejax
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
    ...                  sparsejax.sparse_tx("static", optax.adam(1e-3), sparsity=0.5))
    >>> sparsejax.masks_of(tx.init({"w": jnp.ones((2, 2))}))["w"].sum()
    Array(2, dtype=int32)
    """
    for state in _find_states(opt_state):
        if state.zero_check is not None:
            raise_if_escaped(state)
    masks = _masks(opt_state)
    from flax import nnx

    return nnx.to_pure_dict(masks) if isinstance(masks, nnx.State) else masks


def replace_masks(opt_state: PyTree, masks: PyTree) -> PyTree:
    """``opt_state`` with the :func:`sparse_tx` masks replaced by ``masks`` (same structure,
    bool). The next update zeroes the newly pruned weights; pass the params through
    :func:`zero_pruned` to start from them at once.

    >>> import jax.numpy as jnp, optax, sparsejax
    >>> tx = sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.5)
    >>> state = sparsejax.replace_masks(tx.init({"w": jnp.ones(2)}),
    ...                                 {"w": jnp.array([True, False])})
    >>> sparsejax.masks_of(state)["w"]
    Array([ True, False], dtype=bool)
    """
    old = _find_states(opt_state)
    if len(old) != 1:
        raise ValueError(f"this optimizer state holds {len(old)} sparse_tx states: replace "
                         "the masks of each inside its own state")
    check_same_structure(old[0].masks, masks, reference_name="the current masks")
    check_binary_masks(masks)
    masks = jax.tree_util.tree_map(lambda m: jnp.asarray(m, bool), masks)
    # The next update zeroes the newly pruned weights: the check starts after it.
    return jax.tree_util.tree_map(
        lambda x: x._replace(masks=masks, zero_check=None if x.zero_check is None
                             else x.zero_check._replace(checks_from=x.step + 1))
        if _is_tx_state(x) else x, opt_state,
        is_leaf=_is_tx_state)


def zero_pruned(params: PyTree, opt_state: PyTree) -> PyTree:
    """``params`` with the entries that the :func:`sparse_tx` masks in ``opt_state`` prune
    set to zero: the one extra line before the first step, so that the first forward pass
    already runs the sparse network (for NNX: ``nnx.update(model, zero_pruned(
    nnx.state(model, nnx.Param), optimizer.opt_state))``).

    >>> import jax.numpy as jnp, optax, sparsejax
    >>> tx = sparsejax.sparse_tx("magnitude", optax.sgd(0.1), sparsity=0.5)
    >>> p = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}   # kernels (ndim >= 2) are pruned
    >>> sparsejax.zero_pruned(p, tx.init(p))["w"]
    Array([[ 0., -3.],
           [ 2.,  0.]], dtype=float32)
    """
    params = _pure(params)
    states = _find_states(opt_state)
    if any(state.zero_check is None for state in states):
        raise ValueError(
            "zero_pruned: this optimizer state holds a straight-through method, which "
            "trains every weight and masks them in the forward pass; zeroing the pruned "
            "weights would throw their values away. Keep the params as they are and use "
            "sparsejax.forward_params(params, opt_state) in the loss")
    warn_if_followed(_pure(opt_state), states, _is_tx_state)
    masks = _masks(opt_state)
    # Leaves that no sparse transformation holds (a multi_transform group of another
    # optimizer) are MaskedNode in the masks: keep them.
    try:
        masks = jax.tree_util.tree_map(
            lambda m, p: jnp.ones(jnp.shape(p), bool) if isinstance(m, optax.MaskedNode)
            else m, masks, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    except (ValueError, TypeError):
        pass  # check_same_structure below names the difference
    check_same_structure(params, masks, reference_name="params",
                         other_name="the masks of this optimizer state")
    return zero_masked(params, masks)


def forward_params(params: PyTree, opt_state: PyTree) -> PyTree:
    """What the forward pass of a training step uses: for a straight-through method
    (``ste_magnitude``, ``ste_random``, ``sr_ste``) ``params`` under the masks of the
    :func:`sparse_tx` state in ``opt_state``, with the straight-through gradient
    (:func:`sparsejax.ste_mask`: every weight gets the gradient at the masked weights);
    for the other methods ``params`` as they are (their pruned entries are zero already).
    The one line in the loss of a straight-through method: ``apply_fn({"params":
    forward_params(params, opt_state)}, x)``. Given a Flax NNX module, returns a copy of
    it whose ``nnx.Param`` values are those (inside ``nnx.grad`` the gradient reaches the
    original module's params): ``forward_params(model, optimizer.opt_state)(x)``.

    >>> import jax, jax.numpy as jnp, optax, sparsejax
    >>> tx = sparsejax.sparse_tx("ste_magnitude", optax.sgd(0.1), sparsity=0.5)
    >>> params = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}
    >>> opt_state = tx.init(params)
    >>> sparsejax.forward_params(params, opt_state)["w"]
    Array([[ 0., -3.],
           [ 2.,  0.]], dtype=float32)
    >>> jax.grad(lambda p: sparsejax.forward_params(p, opt_state)["w"].sum())(params)["w"]
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
    """
    from flax import nnx

    if isinstance(params, nnx.Module):
        graphdef, values, rest = nnx.split(params, nnx.Param, ...)
        masked = forward_params(nnx.to_pure_dict(values), opt_state)
        nnx.replace_by_pure_dict(values, masked)
        return nnx.merge(graphdef, values, rest)
    states = _find_states(opt_state)
    if all(state.zero_check is not None for state in states):
        return params
    masks = _masks(opt_state)
    if isinstance(masks, nnx.State):  # an nnx.Optimizer's
        masks = nnx.to_pure_dict(masks)
    params = _pure(params)
    masks = jax.tree_util.tree_map(
        lambda m, p: jnp.ones(jnp.shape(p), bool) if isinstance(m, optax.MaskedNode) else m,
        masks, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    check_same_structure(params, masks, reference_name="params",
                         other_name="the masks of this optimizer state")
    return ste_mask(params, masks)
