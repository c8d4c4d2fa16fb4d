"""Score methods in a Flax linen model of your own, trained with ``TrainState``.

:func:`sparsify` returns a :class:`LinenSparse`: the method's initial state (the frozen
weights its ``weight_init`` drew, the first scores) and ``apply_fn``, the model's
``apply`` behind a variables transform: ``apply_fn({'params': trainables, ...}, x)``
computes the effective weights from the trainables with the method's own functions
(:func:`sparsejax.methods.outside.forward_params`: the top-k masks of the current
scores, then ``method.materialize``) and calls ``apply({'params': effective, ...}, x)``.
So ``TrainState.create(apply_fn=sparse.apply_fn, params=trainables(sparse), tx=tx)`` and
``apply_gradients`` train the scores (and the weights of ``supermask_weights``) as the
native engine does; the frozen weights live in ``apply_fn``.

Edge-Popup, ``supermask_weights`` and ``biprop`` without a density ramp need nothing
more. The gates (per-step noise, a controller) and the ramps read the method's
bookkeeping, the ``'sparsejax'`` collection (``step``, the gates' ``lam``, the top-k
cuts): :class:`SparseTrainState` carries it and runs the rest of the method's update in
``apply_gradients``; pass ``state.variables`` to ``apply_fn`` and :func:`penalty`
(``apply_fn`` refuses to run such a method without the collection).

Evaluation: ``model.apply({'params': effective_params(sparse, variables)}, x)`` (hard
masks, no noise). Tickets: :func:`export_ticket`, :func:`load_ticket`.

>>> import jax, jax.numpy as jnp, optax, flax.linen as nn, sparsejax
>>> from flax.training import train_state
>>> model = nn.Dense(4)
>>> params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))["params"]
>>> sparse = sparsejax.linen.sparsify("edge_popup", model.apply, params, rng=1, sparsity=0.5)
>>> state = train_state.TrainState.create(apply_fn=sparse.apply_fn,
...                                       params=sparsejax.linen.trainables(sparse),
...                                       tx=optax.sgd(0.1))
>>> loss = lambda p, x: jnp.mean(state.apply_fn({"params": p}, x) ** 2)
>>> state = state.apply_gradients(grads=jax.grad(loss)(state.params, jnp.ones((2, 8))))
>>> masks = sparsejax.linen.hard_masks(sparse, {"params": state.params})
>>> int(masks["kernel"].sum()), bool(masks["bias"].all())
(16, True)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from flax import struct
from flax.training import train_state

from sparsejax.methods.base import Method, SparseState
from sparsejax.methods.outside import forward_params, outside_loop
from sparsejax.methods.registry import get_method

__all__ = [
    "COLLECTION",
    "LinenSparse",
    "sparsify",
    "trainables",
    "collection",
    "sparse_state",
    "penalty",
    "advance",
    "effective_params",
    "hard_masks",
    "SparseTrainState",
    "create_train_state",
    "export_ticket",
    "load_ticket",
]

PyTree = Any
Variables = dict[str, Any]
COLLECTION = "sparsejax"
"""The variables collection of the method's bookkeeping: ``step`` and ``SparseState.extra``."""


class LinenSparse(NamedTuple):
    """A score method over a linen model's params (see the module docstring).

    Attributes:
      method: the method.
      state: its state at init: the frozen weights, the first trainables, the PRNG key.
      apply_fn: ``apply_fn(variables, *args, **kwargs)``: the model's ``apply`` with the
        effective weights of ``variables['params']`` (the trainables).
    """

    method: Method
    state: SparseState
    apply_fn: Callable[..., Any]


def collection(sparse: LinenSparse) -> dict[str, Any]:
    """The initial ``'sparsejax'`` collection: ``{'step': 0, **state.extra}``."""
    return {"step": sparse.state.step, **sparse.state.extra}


def trainables(sparse: LinenSparse) -> PyTree:
    """The initial trainables (``TrainState.params``): the scores (``{leaf path:
    scores}``; the gates: the params' structure), or ``{'params', 'scores'}``."""
    return sparse.method.trainables(sparse.state)


def _view(method: Method, initial: SparseState, variables: Variables) -> SparseState:
    """``variables`` as the method's state (the collection defaults to the initial one);
    masks not refreshed."""
    bookkeeping = variables.get(COLLECTION, {"step": initial.step, **initial.extra})
    state = initial.replace(step=bookkeeping["step"],
                            extra={k: bookkeeping[k] for k in initial.extra})
    return outside_loop(method).with_trainables(state, variables["params"])


def sparse_state(sparse: LinenSparse, variables: Variables) -> SparseState:
    """``variables`` (``{'params': trainables, 'sparsejax': ...}``; the collection
    defaults to the initial one) as the method's state, its masks those of the
    trainables (no optimizer state)."""
    return outside_loop(sparse.method).refresh(_view(sparse.method, sparse.state, variables))


def sparsify(method: Method | str, apply_fn: Callable[..., Any], params: PyTree, *,
             rng: jax.Array | int, **options: Any) -> LinenSparse:
    """A score method over the params of a linen model.

    Args:
      method: a method built by :func:`sparsejax.edge_popup`, :func:`sparsejax.biprop`,
        :func:`sparsejax.supermask_weights` or :func:`sparsejax.gates` (its optimizer is
        not used: the ``TrainState``'s ``tx`` trains), or one of those names.
      apply_fn: the model's ``apply``.
      params: the model's ``'params'`` collection.
      rng: the method's PRNG key (or an int seed), as in ``method.init(params, rng)``.
      **options: the method's options when ``method`` is a name.
    """
    if isinstance(method, str):
        method = get_method(method, optax.identity(), **options)
    elif options:
        raise TypeError("options go with a method name; build the method with them instead")
    loop = outside_loop(method)
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    state = jax.jit(method.init)(params, rng)  # as the harness: bitwise its weights
    state = state.replace(opt_state=())

    def sparse_apply(variables: Variables, *args: Any, **kwargs: Any) -> Any:
        if loop.reads_step and COLLECTION not in variables:
            raise ValueError(f"method {method.name!r} reads the step: pass the "
                             f"'{COLLECTION}' collection (SparseTrainState.variables)")
        view = _view(method, state, variables)
        effective, _ = forward_params(method, view, variables["params"])
        rest = {k: v for k, v in variables.items() if k not in ("params", COLLECTION)}
        return apply_fn({"params": effective, **rest}, *args, **kwargs)

    return LinenSparse(method, state, sparse_apply)


def penalty(sparse: LinenSparse, variables: Variables) -> jax.Array:
    """The method's penalty to add to the loss (the gates' expected-L0 term; zero for
    the others); differentiable in ``variables['params']``."""
    return sparse.method.penalty(_view(sparse.method, sparse.state, variables),
                                 variables["params"])


def advance(sparse: LinenSparse, variables: Variables) -> Variables:
    """After the optimizer's step: the rest of the method's update (``step + 1``; the
    gates clip their parameters and run the controller). Returns new
    ``{'params', 'sparsejax'}``."""
    state = outside_loop(sparse.method).advance(_view(sparse.method, sparse.state, variables))
    return {"params": sparse.method.trainables(state),
            COLLECTION: {"step": state.step, **state.extra}}


def effective_params(sparse: LinenSparse, variables: Variables) -> PyTree:
    """The params of evaluation (hard masks, no noise), for the model's own ``apply``."""
    return sparse.method.effective_params(sparse_state(sparse, variables))


def hard_masks(sparse: LinenSparse, variables: Variables) -> PyTree:
    """The binary masks of evaluation, with the params' structure."""
    return sparse.method.hard_masks(sparse_state(sparse, variables))


class SparseTrainState(train_state.TrainState):
    """A ``TrainState`` that carries the method's bookkeeping (``sparsejax``) and runs
    the rest of the method's update in ``apply_gradients``. Build it with
    :func:`create_train_state`; call ``state.apply_fn(state.variables, x)``."""

    sparsejax: dict[str, Any] = struct.field(default_factory=dict)
    advance_fn: Callable[[Variables], Variables] | None = struct.field(
        pytree_node=False, default=None)

    @property
    def variables(self) -> Variables:
        """``{'params': self.params, 'sparsejax': self.sparsejax}``."""
        return {"params": self.params, COLLECTION: self.sparsejax}

    def apply_gradients(self, *, grads: PyTree, **kwargs: Any) -> SparseTrainState:
        new = super().apply_gradients(grads=grads, **kwargs)
        if self.advance_fn is None:
            return new
        advanced = self.advance_fn({"params": new.params, COLLECTION: self.sparsejax})
        return new.replace(params=advanced["params"], sparsejax=advanced[COLLECTION])


def create_train_state(sparse: LinenSparse,
                       tx: optax.GradientTransformation) -> SparseTrainState:
    """A :class:`SparseTrainState` over the method's trainables, trained by ``tx``."""
    return SparseTrainState.create(
        apply_fn=sparse.apply_fn, params=trainables(sparse), tx=tx,
        sparsejax=collection(sparse), advance_fn=lambda v: advance(sparse, v))


def export_ticket(sparse: LinenSparse, variables: Variables,
                  output: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the ticket of ``variables`` (hard masks; digests of the frozen and the
    effective weights) with :func:`sparsejax.harness.tickets.export_state_ticket`."""
    from sparsejax.io.tickets import export_state_ticket

    if outside_loop(sparse.method).trains_weights:
        raise ValueError(f"method {sparse.method.name!r} trains the weights: a ticket is "
                         "frozen weights plus a mask")
    return export_state_ticket(sparse.method, sparse_state(sparse, variables), output,
                               source="sparsejax.linen")


def load_ticket(sparse: LinenSparse, path: str | os.PathLike[str]) -> PyTree:
    """The params of a ticket for the model's own ``apply``; ``sparse`` holds the same
    frozen weights as the exported one (same params, same ``rng``)."""
    from sparsejax.io.tickets import load_state_ticket

    state = sparse_state(sparse, {"params": trainables(sparse)})
    return load_state_ticket(sparse.method, state, path)[0]
