"""Score methods in a Flax NNX model of your own, trained with ``nnx.Optimizer``.

:func:`sparsify` turns a model's ``nnx.Param`` variables, in place, into what a score
method trains and keeps, each a ``Variable`` type of its own:

* :class:`Frozen`: the weights a strong-ticket method never changes (``fc1/kernel``,
  ``fc1/bias``), drawn by the method's ``weight_init`` as the native method draws them
  (``weight_init='model'`` keeps the model's own). ``supermask_weights`` trains its
  weights, which stay ``nnx.Param``;
* :class:`Score`: one score per prunable weight beside it (``fc1/kernel_scores``);
  :class:`Gate` (a ``Score``) for the gate parameters of :func:`sparsejax.gates`
  (``fc1/kernel_gates``);
* :class:`MethodState`: the method's bookkeeping under ``sparsejax/`` (``step``, ``rng``,
  the gates' ``lam``, the top-k cuts); never trained.

The model's ``__call__`` then computes the effective weights with the method's own
functions (:func:`sparsejax.methods.outside.forward_params`: the top-k masks of the
current scores, then ``method.materialize``), puts them into the kernels, runs the
model's own ``__call__`` and puts the frozen weights back. So the forward is the native
engine's: the same masks, the same straight-through gradients, the same gate noise
(``fold_in(rng, step)``). After ``model.eval()`` (or ``nnx.view(model,
deterministic=True)``) it uses the hard, noise-free masks of evaluation.

A train step: differentiate and update the ``nnx.Param``s (the scores, a kind of
``nnx.Param``; the weights of ``supermask_weights``; biases and norms with
``other_params='trained'``), the dense model's step unchanged; add :func:`penalty` (the
gates' expected-L0 term; zero for the others), and call :func:`update` after the
optimizer (the step counter the gates' noise and ramps read, the gates' controller);
:class:`Optimizer` does that last call itself.

>>> import jax, jax.numpy as jnp, optax, sparsejax
>>> from flax import nnx
>>> model = nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
>>> model = sparsejax.nnx.sparsify(model, "edge_popup", sparsity=0.5, rng=1,
...                                other_params="frozen")   # the bias: kept at init
>>> optimizer = sparsejax.nnx.Optimizer(model, optax.sgd(0.1))   # wrt=Trainable
>>> @nnx.jit
... def train_step(model, optimizer, x):
...     def loss_fn(model):
...         return jnp.mean(model(x) ** 2) + sparsejax.nnx.penalty(model)
...     grads = nnx.grad(loss_fn)(model)   # a Score is an nnx.Param
...     optimizer.update(model, grads)   # also runs sparsejax.nnx.update(model)
>>> train_step(model, optimizer, jnp.ones((2, 8)))
>>> [path for path, _ in nnx.to_flat_state(nnx.state(model, sparsejax.nnx.Score))]
[('layers', 0, 'kernel_scores')]
>>> masks = sparsejax.nnx.hard_masks(model)
>>> int(masks["layers"][0]["kernel"].sum()), int(model.sparsejax.step[...])
(16, 1)
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, TypeVar

import jax
import optax
from flax import nnx

from sparsejax.core._tree import path_str
from sparsejax.core.masks import dense_masks
from sparsejax.core.validation import as_key
from sparsejax.methods.base import Method, SparseState
from sparsejax.methods.outside import forward_params, outside_loop
from sparsejax.methods.registry import get_method

__all__ = [
    "Frozen",
    "Score",
    "Gate",
    "MethodState",
    "Trainable",
    "sparsify",
    "update",
    "penalty",
    "Optimizer",
    "sparse_state",
    "hard_masks",
    "effective_params",
    "effective_model",
    "export_ticket",
    "load_ticket",
]

M = TypeVar("M", bound=nnx.Module)
PyTree = Any
Path = tuple[Any, ...]
ATTRIBUTE = "sparsejax"
"""The attribute of the root module that holds the method's bookkeeping."""


class Frozen(nnx.Variable):
    """Weights a method keeps fixed (the random weights of a strong ticket)."""


class Score(nnx.Param):
    """Trainable per-weight variables of a score method, beside the weight they score.

    A kind of ``nnx.Param`` (as Flax's ``nnx.LoRAParam``), so a train step written for the
    dense model, ``nnx.grad(loss_fn)(model)`` with ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``, trains the scores unchanged; ``wrt=Score`` selects them alone."""


class Gate(Score):
    """The gate parameters of :func:`sparsejax.gates` (a :class:`Score`)."""


class MethodState(nnx.Variable):
    """A method's bookkeeping: step counter, PRNG key, controller state; not trained."""


Trainable = nnx.Param
"""What a method trains: its scores, and what stays ``nnx.Param`` (the weights of
``supermask_weights``; biases and norms with ``other_params='trained'``). Since a
:class:`Score` is an ``nnx.Param``, it selects what ``nnx.Param`` selects; use either as
``wrt=`` and in ``nnx.DiffState``."""


class SparseVars(nnx.Module):
    """The bookkeeping module ``model.sparsejax``: the method (static), the paths of the
    leaves it sees, ``step``, ``rng`` and the entries of ``SparseState.extra``."""

    def __init__(self, method: Method, paths: tuple[Path, ...], suffix: str,
                 state: SparseState, other_params: str = "frozen") -> None:
        self.method = method
        self.paths = paths
        self.suffix = suffix
        self.other_params = other_params
        self.deterministic = False
        self.step = MethodState(state.step)
        self.rng = MethodState(state.rng)
        self.extra_keys = tuple(sorted(state.extra))
        for key in self.extra_keys:
            setattr(self, key, MethodState(state.extra[key]))

    def set_view(self, deterministic: bool | None = None) -> None:
        """``nnx.view(model, deterministic=True)``: evaluate with the hard masks."""
        if deterministic is not None:
            self.deterministic = deterministic


def _nest(flat: dict[Path, Any]) -> dict[Any, Any]:
    tree: dict[Any, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flat(tree: PyTree) -> dict[Path, Any]:
    return {tuple(k.key for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _name(path: Path) -> str:
    return "/".join(str(k) for k in path)


def _vars(model: nnx.Module) -> SparseVars:
    sparse = getattr(model, ATTRIBUTE, None)
    if not isinstance(sparse, SparseVars):
        raise ValueError(f"{type(model).__name__} is not sparsified: call "
                         "sparsejax.nnx.sparsify(model, method) first")
    return sparse


def _variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    return {p: v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def _score_path(sparse: SparseVars, path: Path) -> Path:
    return (*path[:-1], f"{path[-1]}{sparse.suffix}")


def _view(model: nnx.Module) -> tuple[SparseState, dict[Path, nnx.Variable]]:
    """The model's variables as the method's :class:`SparseState` (no optimizer state)."""
    sparse = _vars(model)
    variables = _variables(model)
    params = _nest({p: variables[p].get_value() for p in sparse.paths})
    scores = {_name(p): variables[_score_path(sparse, p)].get_value()
              for p in sparse.paths if _score_path(sparse, p) in variables}
    if outside_loop(sparse.method).scores_layout == "like_params":
        empty = jax.numpy.zeros((0,), jax.numpy.float32)
        scores = jax.tree_util.tree_map_with_path(
            lambda p, _: scores.get(path_str(p), empty), params)
    state = SparseState(
        step=sparse.step.get_value(), params=params, masks=dense_masks(params),
        scores=scores, opt_state=(), rng=sparse.rng.get_value(), model_state={},
        extra={k: getattr(sparse, k).get_value() for k in sparse.extra_keys})
    return state, variables


def _scores_by_path(sparse: SparseVars, state: SparseState) -> dict[Path, jax.Array]:
    by_name = ({_name(p): s for p, s in _flat(state.scores).items()}
               if outside_loop(sparse.method).scores_layout == "like_params"
               else dict(state.scores))
    return {p: by_name[_name(p)] for p in sparse.paths
            if _name(p) in by_name and by_name[_name(p)].shape == _flat_get(state, p).shape}


def _flat_get(state: SparseState, path: Path) -> jax.Array:
    node = state.params
    for key in path:
        node = node[key]
    return node


def _write_state(model: nnx.Module, state: SparseState,
                 variables: dict[Path, nnx.Variable], *, scores: bool) -> None:
    sparse = _vars(model)
    sparse.step.set_value(state.step)
    for key in sparse.extra_keys:
        getattr(sparse, key).set_value(state.extra[key])
    if scores:
        for path, value in _scores_by_path(sparse, state).items():
            variables[_score_path(sparse, path)].set_value(value)


def _sparse_call(self: nnx.Module, call: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    sparse = _vars(self)
    method = sparse.method
    state, variables = _view(self)
    if sparse.deterministic:
        refreshed = outside_loop(method).refresh(state)
        effective = method.effective_params(refreshed)
    else:
        effective, refreshed = forward_params(method, state, method.trainables(state))
    for key in sparse.extra_keys:  # the top-k cuts, where the next search starts
        getattr(sparse, key).set_value(refreshed.extra[key])
    saved = {p: variables[p].get_value() for p in sparse.paths}
    for path, value in _flat(effective).items():
        variables[path].set_value(value)
    try:
        return call(self, *args, **kwargs)
    finally:
        for path, value in saved.items():
            variables[path].set_value(value)


_CLASSES: dict[type, type] = {}


def _sparse_class(cls: type) -> type:
    if cls not in _CLASSES:
        call = next((c.__dict__["__call__"] for c in cls.__mro__ if "__call__" in c.__dict__),
                    None)
        if call is None:
            raise TypeError(f"{cls.__name__} has no __call__ to run with effective weights")

        @functools.wraps(call)
        def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
            return _sparse_call(self, call, args, kwargs)

        _CLASSES[cls] = type(cls)(f"Sparse{cls.__name__}", (cls,), {
            "__call__": __call__, "__module__": cls.__module__,
            "__qualname__": f"Sparse{cls.__qualname__}", "_sparsejax_base": cls})
    return _CLASSES[cls]


def sparsify(model: M, method: Method | str, *, rng: jax.Array | int,
             other_params: str | None = None, **options: Any) -> M:
    """Turn ``model`` (in place; also returned) into a model trained by a score method.

    Args:
      model: a Flax NNX module with a ``__call__``; every ``nnx.Param`` is a leaf the
        method sees, at the path ``nnx.state(model, nnx.Param)`` shows.
      method: a method built by :func:`sparsejax.edge_popup`, :func:`sparsejax.biprop`,
        :func:`sparsejax.supermask_weights` or :func:`sparsejax.gates` (its optimizer is
        not used: ``nnx.Optimizer`` trains), or one of those names with ``options``.
      rng: the method's PRNG key (or an int seed): the weight and score inits, the gates'
        per-step noise ``fold_in(rng, step)``, as the native ``method.init(params, rng)``.
      other_params: what becomes of the params the method gives no scores (biases,
        ``BatchNorm``/``LayerNorm`` scale and bias): ``'frozen'`` (:class:`Frozen` at the
        model's init, as the native methods and the papers: Edge-Popup trains no biases or
        affine norm parameters) or ``'trained'`` (they stay ``nnx.Param`` and the
        optimizer trains them beside the scores; a ticket then needs them too, so
        :func:`export_ticket` refuses). ``None`` (the default) freezes them and warns,
        naming them, when the model has any. ``supermask_weights`` trains every param.
      **options: the method's options when ``method`` is a name (``sparsity=0.5``, ...).

    Per-layer densities, weight and score inits are the native method's for these params.
    """
    if other_params not in (None, "frozen", "trained"):
        raise ValueError(f"other_params must be 'frozen' or 'trained', got {other_params!r}")
    if isinstance(method, str):
        method = get_method(method, optax.identity(), **options)
    elif options:
        raise TypeError("options go with a method name; build the method with them instead")
    loop = outside_loop(method)
    if isinstance(getattr(model, ATTRIBUTE, None), SparseVars):
        raise ValueError(f"{type(model).__name__} is already sparsified")
    rng = as_key(rng, "rng")
    nodes = dict(nnx.iter_graph(model))
    paths = tuple(sorted((p for p, v in nodes.items() if isinstance(v, nnx.Param)),
                         key=_name))
    if not paths:
        raise ValueError(f"{type(model).__name__} has no nnx.Param to sparsify")
    params = _nest({p: nodes[p].get_value() for p in paths})
    state = jax.jit(method.init)(params, rng)  # as the harness: bitwise its weights
    suffix = "_gates" if loop.scores_layout == "like_params" else "_scores"
    if loop.trains_weights and other_params == "frozen":
        raise ValueError(f"method {method.name!r} trains every param: other_params='frozen' "
                         "does not apply to it")
    sparse = SparseVars(method, paths, suffix, state,
                        "trained" if loop.trains_weights else other_params or "frozen")
    new_params = _flat(state.params)
    scored = _scores_by_path(sparse, state)
    others = [path for path in paths if path not in scored]
    if other_params is None and others and not loop.trains_weights:
        names = ", ".join(_name(p) for p in others[:6]) + (", ..." if len(others) > 6 else "")
        warnings.warn(
            f"sparsify({method.name!r}) freezes {len(others)} param(s) it gives no scores "
            f"({names}) at their init, as the papers do; pass other_params='trained' to "
            "train them with the scores, or other_params='frozen' to keep this and silence "
            "the warning", UserWarning, stacklevel=2)
    for path in paths:
        variable = nodes[path]
        if loop.trains_weights or (path in others and sparse.other_params == "trained"):
            variable.set_value(new_params[path])
        else:
            setattr(nodes[path[:-1]], path[-1],
                    Frozen.from_metadata(new_params[path], variable.get_metadata()))
    kind = Gate if loop.scores_layout == "like_params" else Score
    for path, value in scored.items():
        if not isinstance(path[-1], str) or hasattr(nodes[path[:-1]], path[-1] + suffix):
            raise ValueError(f"cannot place the scores of {_name(path)} beside it")
        setattr(nodes[path[:-1]], path[-1] + suffix, kind(value))
    setattr(model, ATTRIBUTE, sparse)
    model.__class__ = _sparse_class(type(model))
    return model


def update(model: nnx.Module) -> None:
    """After the optimizer's step: the rest of the method's update (``step + 1``; the
    gates clip their parameters and run the density controller)."""
    sparse = _vars(model)
    state, variables = _view(model)
    _write_state(model, outside_loop(sparse.method).advance(state), variables, scores=True)


def penalty(model: nnx.Module) -> jax.Array:
    """The method's penalty (the gates' expected-L0 term; zero for the others) to add to
    the loss; differentiable in the scores."""
    method = _vars(model).method
    state, _ = _view(model)
    return method.penalty(state, method.trainables(state))


class Optimizer(nnx.Optimizer):
    """``nnx.Optimizer`` over :data:`Trainable` whose ``update`` also runs :func:`update`."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
                 wrt: Any = Trainable, **kwargs: Any) -> None:
        super().__init__(model, tx, wrt=wrt, **kwargs)

    def update(self, model: nnx.Module, grads: Any, /, **kwargs: Any) -> Any:
        out = super().update(model, grads, **kwargs)
        update(model)
        return out


def sparse_state(model: nnx.Module) -> SparseState:
    """The model's variables as the method's :class:`~sparsejax.SparseState` (masks
    current; ``opt_state`` empty): for the method's own functions."""
    state, _ = _view(model)
    return outside_loop(_vars(model).method).refresh(state)


def hard_masks(model: nnx.Module) -> PyTree:
    """The binary masks of evaluation, nested like ``nnx.state(model, Frozen)``."""
    return _vars(model).method.hard_masks(sparse_state(model))


def effective_params(model: nnx.Module) -> PyTree:
    """The effective weights of evaluation (hard masks, no noise), nested by path."""
    return _vars(model).method.effective_params(sparse_state(model))


def _plain_model(model: M, params: PyTree) -> M:
    sparse = _vars(model)
    plain = nnx.clone(model)
    nodes = dict(nnx.iter_graph(plain))
    for path, value in _flat(params).items():
        setattr(nodes[path[:-1]], path[-1],
                nnx.Param.from_metadata(value, nodes[path].get_metadata()))
        if _score_path(sparse, path) in nodes:
            delattr(nodes[path[:-1]], path[-1] + sparse.suffix)
    delattr(plain, ATTRIBUTE)
    plain.__class__ = type(model)._sparsejax_base
    return plain


def effective_model(model: M) -> M:
    """A copy of ``model`` as the plain model it was (its own class, ``nnx.Param``
    kernels, no scores) holding the effective weights of evaluation."""
    return _plain_model(model, effective_params(model))


def export_ticket(model: nnx.Module, output: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the model's ticket (bit-packed hard masks, digests of the frozen and the
    effective weights) with :func:`sparsejax.harness.tickets.export_state_ticket`."""
    from sparsejax.io.tickets import export_state_ticket

    sparse = _vars(model)
    if outside_loop(sparse.method).trains_weights:
        raise ValueError(f"method {sparse.method.name!r} trains the weights: a ticket is "
                         "frozen weights plus a mask")
    if sparse.other_params == "trained":
        raise ValueError("this model trains its biases and norms (other_params='trained'): "
                         "a ticket is frozen weights plus a mask; save the model instead")
    return export_state_ticket(sparse.method, sparse_state(model), output,
                               source="sparsejax.nnx")


def load_ticket(model: M, path: str | os.PathLike[str]) -> M:
    """The plain model of a ticket: ``model`` is sparsified with the same frozen weights
    as the exported one (same model init and ``rng``); its masks are replaced by the
    ticket's. Raises ``ValueError`` when the frozen or rebuilt weights differ."""
    from sparsejax.io.tickets import load_state_ticket

    sparse = _vars(model)
    params, _, _ = load_state_ticket(sparse.method, sparse_state(model), path)
    return _plain_model(model, params)
