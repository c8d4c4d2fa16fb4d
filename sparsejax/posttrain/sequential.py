"""Sequential post-training pruning of a whole model, layer after layer.

Each Dense layer is pruned (magnitude, Wanda or SparseGPT, by
:func:`sparsejax.posttrain.pruners.prune_layer_hessian`) on the inputs that the layers already
pruned before it produce: the granularity of IST-DASLab's ``--true_sequential``, applied
across the whole model. :func:`prune_sequential` drives any linen model whose prunable
kernels are all ``nn.Dense`` kernels (the GPT, the MLPs) or ``nn.Einsum`` kernels (as
matrices, :mod:`~sparsejax.posttrain.kernels`): the layers are found in call
order by :func:`sparsejax.posttrain.capture.dense_calls`; for each layer, or group of
layers that share one input (query, key, value), the forward is run again from the
model's input with the current params on every calibration batch and ``H = X^T X`` is
summed over the batches. Memory is bounded by one layer's Hessian and one batch of
activations, but the time grows with the depth squared. The reference code's
block-by-block form (the calibration set run once, each block's inputs cached) is
:func:`sparsejax.posttrain.blocks.prune_blocks`, linear in depth.
:func:`prune_mlp_sequential` is the same on the params of an MLP alone.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import path_str
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern, as_pattern
from sparsejax.core.validation import is_int
from sparsejax.posttrain.capture import LayerPath, capture_calls, dense_calls
from sparsejax.posttrain.kernels import prune_kernel
from sparsejax.posttrain.pruners import (
    PosttrainMethod,
    check_posttrain_method,
    check_posttrain_pattern,
    input_hessian,
    posttrain_density,
)

__all__ = ["LayerReport", "prune_sequential", "prune_mlp_sequential"]


class LayerReport(NamedTuple):
    """One layer of :func:`prune_sequential`: its name (params path, e.g.
    ``block1/attn/query``), the density kept, and the
    relative reconstruction error ``||X W - X W'||_F / ||X W||_F`` on the calibration
    inputs ``X`` that reached it."""

    name: str
    density: float
    reconstruction_error: float


_HIDDEN = re.compile(r"^fc(\d+)$")


def _mlp_layer_names(params: Mapping[str, Any]) -> list[str]:
    """``fc1 ... fcN, head`` in forward order; ``ValueError`` for any other layout."""
    names = list(params)
    hidden = sorted((n for n in names if _HIDDEN.match(n)), key=lambda n: int(n[2:]))
    expected = [f"fc{i}" for i in range(1, len(hidden) + 1)]
    if hidden != expected or set(names) != set(hidden) | {"head"}:
        raise ValueError(f"prune_mlp_sequential expects the params of an MLP with layers "
                         f"fc1 ... fcN and head (sparsejax.harness.models LeNet300 / MLP), got "
                         f"{sorted(names)}")
    return hidden + ["head"]


class _ReluMLP(nn.Module):
    """The forward of a params tree ``fc1 ... fcN, head``: inputs flattened per example,
    Dense + ReLU per hidden layer, Dense head; what the zoo's ``LeNet300`` / ``MLP`` compute
    (the library does not import the zoo)."""

    hidden: tuple[int, ...]
    num_classes: int
    use_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x).reshape((x.shape[0], -1))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.float32)
        for i, features in enumerate(self.hidden, start=1):
            x = nn.relu(nn.Dense(features, use_bias=self.use_bias, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="head")(x)


def prune_mlp_sequential(params: Mapping[str, Any], calibration_inputs: jax.Array,
                         method: PosttrainMethod,
                         pattern: str | Pattern | Mapping[str, str | Pattern] = "unstructured",
                         sparsity: float | None = None,
                         **options: Any) -> tuple[dict[str, Any], list[LayerReport]]:
    """Prune every Dense kernel of an MLP (``fc1 ... fcN``, ``head``; ReLU between, as
    ``sparsejax.harness.models.LeNet300`` / ``MLP``), layer after layer: each layer is pruned on
    the inputs produced by the layers already pruned before it. Calibration inputs are
    flattened per example, as the models do. Biases stay dense.

    ``pattern`` is one pattern for every layer or a mapping from every layer name to its
    own (e.g. ``4:8`` where the input size allows it, ``2:4`` elsewhere). Every layer is
    checked against its pattern before any is pruned; ``options`` go to
    :func:`prune_layer`. Returns the pruned params (same structure) and one
    :class:`LayerReport` per layer.

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.harness.models.mlp import MLP
    >>> model = MLP(num_classes=3, hidden=(8,))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    >>> x = jax.random.normal(jax.random.key(1), (32, 8))
    >>> pruned, report = prune_mlp_sequential(params, x, "wanda", "unstructured", 0.5)
    >>> [(r.name, r.density) for r in report]
    [('fc1', 0.5), ('head', 0.5)]
    """
    names = _mlp_layer_names(params)
    model = _ReluMLP(num_classes=int(np.shape(params["head"]["kernel"])[1]),
                     use_bias="bias" in params["head"],
                     hidden=tuple(int(np.shape(params[n]["kernel"])[1]) for n in names[:-1]))
    pruned, report = prune_sequential(model, params, calibration_inputs, method, pattern,
                                      sparsity, **options)
    return dict(pruned), report


def prune_sequential(model: nn.Module, params: Any, calibration_inputs: jax.Array,
                     method: PosttrainMethod,
                     pattern: str | Pattern | Mapping[str, str | Pattern] = "unstructured",
                     sparsity: float | None = None, *, model_state: Mapping[str, Any] | None = None,
                     batch_size: int | None = None, prunable: Prunable = default_prunable,
                     apply_kwargs: Mapping[str, Any] | None = None,
                     **options: Any) -> tuple[Any, list[LayerReport]]:
    """Prune every prunable Dense kernel of the linen ``model`` (``params``, and
    ``model_state`` such as batch statistics), layer after layer in call order: each
    layer, or group of layers that share one input, is pruned on the inputs the forward
    gives it with every layer before it already pruned. The forward is re-run from the
    model's input for every group, so the time grows with the depth squared;
    :func:`~sparsejax.posttrain.blocks.prune_blocks` prunes block by block on cached
    activations (linear in depth), as the Wanda and SparseGPT reference code does.

    ``calibration_inputs`` are model inputs (examples first), run ``batch_size`` examples
    at a time (``None``: all at once); ``H = X^T X`` of each layer is summed over the
    batches, so memory holds one Hessian and one batch of activations. ``apply_kwargs``
    go to ``model.apply`` (e.g. ``{"train": False}``) and must be hashable. The layers
    pruned are those whose ``kernel`` the ``prunable`` filter selects (default: every
    Dense kernel, the head included; embeddings, norms and biases stay dense); a
    prunable leaf that is not a Dense kernel the forward calls (a Conv kernel) is a
    ``ValueError``. ``pattern``: one for all, or a mapping from every layer name
    (``'block1/attn/query'``) to its own. ``options`` go to
    :func:`~sparsejax.posttrain.pruners.prune_layer_hessian`. Returns the pruned params (the
    structure of ``params``) and one :class:`LayerReport` per layer, in call order.

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.harness.models.gpt import GPT
    >>> model = GPT(num_classes=7, n_layer=1, n_embd=8, n_head=2, context=4)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> tokens = jax.random.randint(jax.random.key(1), (6, 4), 0, 7)
    >>> pruned, report = prune_sequential(model, params, tokens, "sparsegpt", "2:4",
    ...                                   batch_size=3)
    >>> [r.name for r in report][:4], {r.density for r in report}
    (['block1/attn/query', 'block1/attn/key', 'block1/attn/value', 'block1/attn/out'], {0.5})
    """
    batches = calibration_batches(calibration_inputs, batch_size)
    kwargs = tuple(sorted((apply_kwargs or {}).items()))
    state = dict(model_state or {})
    calls = dense_calls(model, {"params": params, **state}, batches[0], **dict(kwargs))
    layers = _prunable_layers(params, calls, prunable)
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    names = ["/".join(c.path) for c in layers]
    patterns = layer_patterns({n: c.layout.matrix_shape(np.shape(flat[f"{n}/kernel"]))
                                for n, c in zip(names, layers, strict=True)},
                               method, pattern, sparsity, options)
    report = []
    for group in dict.fromkeys(c.group for c in layers):
        members = [c for c in layers if c.group == group]
        current = rebuild_params(params, flat)
        hessian = sum(_batch_hessian(model, members[0].path, kwargs,
                                     {"params": current, **state}, batch) for batch in batches)
        for call in members:
            name = "/".join(call.path)
            flat[f"{name}/kernel"], density, error = prune_kernel(
                method, flat[f"{name}/kernel"], hessian, call.layout, patterns[name], sparsity,
                name, **options)
            report.append(LayerReport(name, density, error))
    return rebuild_params(params, flat), report


def calibration_batches(calibration_inputs: Any, batch_size: int | None) -> list[jax.Array]:
    """The calibration inputs (examples first) cut into batches of ``batch_size`` examples
    (``None``: one batch); ``ValueError`` for no examples or a bad ``batch_size``."""
    inputs = jnp.asarray(calibration_inputs)
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"calibration inputs must hold at least one example, got shape "
                         f"{inputs.shape}")
    size = inputs.shape[0] if batch_size is None else batch_size
    if not is_int(size) or size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return [inputs[i:i + size] for i in range(0, inputs.shape[0], size)]


def _prunable_layers(params: Any, calls: list[Any], prunable: Prunable) -> list[Any]:
    """The calls whose kernel ``prunable`` selects; ``ValueError`` for a prunable leaf
    that is no called Dense layer's kernel."""
    kernels = {"/".join(c.path) + "/kernel": c for c in calls}
    chosen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        if not prunable(name, leaf):
            continue
        if name not in kernels or kernels[name].layout.refused is not None:
            why = ("" if name not in kernels else
                   f": {name[:-len('/kernel')]} {kernels[name].layout.refused}")
            raise ValueError(f"{name} is prunable but is not the kernel of an nn.Dense or "
                             f"nn.Einsum layer that the forward calls{why}; post-training "
                             f"pruning supports those kernels only (Conv and other layers "
                             f"are not supported yet)")
        chosen.add(name)
    return [c for c in calls if "/".join(c.path) + "/kernel" in chosen]


def rebuild_params(params: Any, flat: Mapping[str, Any]) -> Any:
    """``params`` with every leaf replaced by ``flat[its path]``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[path_str(p)], params)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _batch_hessian(model: nn.Module, path: LayerPath, kwargs: tuple[tuple[str, Any], ...],
                   variables: Any, batch: jax.Array) -> jax.Array:
    """``X^T X`` of the input layer ``path`` sees on ``batch`` (the forward stops there)."""
    return input_hessian(capture_calls(model, variables, (batch,), dict(kwargs), [path],
                                  flatten=True)[path])


def layer_patterns(shapes: Mapping[str, tuple[int, ...]], method: str,
                    pattern: str | Pattern | Mapping[str, str | Pattern],
                    sparsity: float | None, options: Mapping[str, Any]) -> dict[str, Pattern]:
    """Every layer's pattern (one for all, or a mapping naming every layer), each checked
    against ``method`` (and its ``blocksize`` option), its kernel's shape and
    ``sparsity`` up front, before any Hessian forward and minutes of pruning."""
    check_posttrain_method(method)
    names = list(shapes)
    if isinstance(pattern, Mapping):
        if set(pattern) != set(names):
            raise ValueError(f"pattern mapping must name every layer {names}, got "
                             f"{sorted(pattern)}")
        patterns = {name: as_pattern(pattern[name]) for name in names}
    else:
        patterns = dict.fromkeys(names, as_pattern(pattern))
    blocksize = {"blocksize": options["blocksize"]} if "blocksize" in options else {}
    for name in names:
        try:
            check_posttrain_pattern(method, patterns[name], **blocksize)
            patterns[name].check_shape(shapes[name], where=f"{name}/kernel")
            posttrain_density(patterns[name], sparsity)
        except ValueError as error:
            raise ValueError(f"{name}/kernel: {error}" if not str(error).startswith(name)
                             else str(error)) from None
    return patterns
