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

The pieces are the method's own field, :attr:`Method.outside <sparsejax.Method>` (set by
:func:`sparsejax.edge_popup`, :func:`sparsejax.biprop`, :func:`sparsejax.supermask_weights`
and :func:`sparsejax.gates`), so ``method._replace(...)`` keeps them;
:func:`outside_loop` returns them or says which methods have them.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from sparsejax.methods.base import Method, OutsideLoop, SparseState

__all__ = ["OutsideLoop", "outside_loop", "forward_params"]

PyTree = Any


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
    if method.outside is None:
        raise ValueError(
            f"method {method.name!r} has no outside-optimizer form here; the score methods "
            "(edge_popup, biprop, supermask_weights, gates) do. Methods that train the "
            "weights are optax transformations: sparsejax.sparse_tx")
    return method.outside


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
