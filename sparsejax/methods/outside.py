"""A method's update without its optimizer, for loops that run an optimizer of their own.

A Flax NNX loop steps the trainables with ``nnx.Optimizer``, a linen loop with
``TrainState.apply_gradients``; what a score method does besides the optimizer step
(choose the masks of the new scores, count the step, run the gates' controller) must then
run outside :attr:`Method.update`. Every such method splits its update in three, and its
native ``update`` is exactly their composition::

    update(state, grads) == refresh(advance(<state with the optimizer's new trainables>))

so a loop with its own optimizer runs the same code as the native engine:

* :attr:`OutsideLoop.with_trainables` puts trainables changed by the outside optimizer
  back into a :class:`~sparsejax.methods.base.SparseState`;
* :attr:`OutsideLoop.advance` is the rest of ``update`` (``step + 1``, the controller);
* :attr:`OutsideLoop.refresh` derives what the training forward reads besides the
  trainables (the score methods' top-k masks of the current scores) at ``state.step``;
  :func:`forward_params` runs it on the current trainables before ``materialize``, so
  the masks follow the scores whatever optimizer moved them.

:func:`outside_loop` finds the pieces of a method built by :func:`sparsejax.edge_popup`,
:func:`sparsejax.biprop`, :func:`sparsejax.supermask_weights` or :func:`sparsejax.gates`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
from jax import lax

from sparsejax.methods.base import Method, SparseState

__all__ = ["OutsideLoop", "register_outside_loop", "outside_loop", "forward_params"]

PyTree = Any


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


# Keyed by ``method.init``: a Method is a tuple (no weak references), and its ``update``
# is wrapped when the Method is built; ``init`` is the builder's own function.
_LOOPS: weakref.WeakKeyDictionary[Callable[..., Any], OutsideLoop] = weakref.WeakKeyDictionary()


def register_outside_loop(method: Method, loop: OutsideLoop) -> Method:
    """Record ``loop`` as the outside-optimizer pieces of ``method``; returns ``method``."""
    _LOOPS[method.init] = loop
    return method


def outside_loop(method: Method) -> OutsideLoop:
    """The :class:`OutsideLoop` of a score method.

    >>> import optax, sparsejax
    >>> outside_loop(sparsejax.edge_popup(optax.sgd(0.1), sparsity=0.5)).scores_layout
    'by_path'
    >>> outside_loop(sparsejax.static(optax.sgd(0.1), sparsity=0.5))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: method 'static' has no outside-optimizer form here; ...
    """
    try:
        return _LOOPS[method.init]
    except (KeyError, TypeError):
        raise ValueError(
            f"method {method.name!r} has no outside-optimizer form here; the score methods "
            "(edge_popup, biprop, supermask_weights, gates) do. Methods that train the "
            "weights are optax transformations: sparsejax.sparse_tx") from None


def forward_params(method: Method, state: SparseState,
                   trainables: PyTree) -> tuple[PyTree, SparseState]:
    """The effective params of the training forward pass for the current ``trainables``
    (differentiable in them, as ``method.materialize``), and the refreshed state (its
    masks are those of ``trainables`` at ``state.step``; its top-k cuts start the next
    search). The masks are chosen on ``stop_gradient`` copies: a top-k has no gradient.

    >>> import jax, jax.numpy as jnp, optax, sparsejax
    >>> method = sparsejax.edge_popup(optax.sgd(0.1), sparsity=0.5, weight_init="model")
    >>> state = method.init({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}, jax.random.PRNGKey(0))
    >>> scores = {"w": jnp.array([[0.1, -0.9], [0.5, 0.2]])}  # moved by some optimizer
    >>> forward_params(method, state, scores)[0]["w"]
    Array([[0., 2.],
           [3., 0.]], dtype=float32)
    """
    loop = outside_loop(method)
    fixed = loop.with_trainables(state, jax.tree_util.tree_map(lax.stop_gradient, trainables))
    refreshed = loop.refresh(fixed)
    return method.materialize(refreshed, trainables), refreshed
