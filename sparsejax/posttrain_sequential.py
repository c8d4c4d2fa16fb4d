"""Sequential post-training pruning of a whole model, layer after layer.

Each layer is pruned (by :func:`sparsejax.posttrain.prune_layer`: magnitude, Wanda or
SparseGPT) on the inputs that the layers already pruned before it produce, as SparseGPT
and Wanda prune a transformer block by block. Memory is bounded by one layer's Hessian
and one batch of calibration activations. This slice drives the MLPs of
``sparsejax.models`` (``LeNet300`` / ``MLP``: Dense layers ``fc1 ... fcN`` and ``head``,
ReLU between).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.patterns import Pattern, as_pattern
from sparsejax.posttrain import (
    POSTTRAIN_METHODS,
    PosttrainMethod,
    _density,
    prune_layer,
    reconstruction_error,
)

__all__ = ["LayerReport", "prune_mlp_sequential"]


class LayerReport(NamedTuple):
    """One layer of :func:`prune_mlp_sequential`: its name, the density kept, and the
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
                         f"fc1 ... fcN and head (sparsejax.models LeNet300 / MLP), got "
                         f"{sorted(names)}")
    return hidden + ["head"]


def prune_mlp_sequential(params: Mapping[str, Any], calibration_inputs: jax.Array,
                         method: PosttrainMethod,
                         pattern: str | Pattern | Mapping[str, str | Pattern] = "unstructured",
                         sparsity: float | None = None,
                         **options: Any) -> tuple[dict[str, Any], list[LayerReport]]:
    """Prune every Dense kernel of an MLP (``fc1 ... fcN``, ``head``; ReLU between, as
    ``sparsejax.models.LeNet300`` / ``MLP``), layer after layer: each layer is pruned on
    the inputs produced by the layers already pruned before it. Calibration inputs are
    flattened per example, as the models do. Biases stay dense.

    ``pattern`` is one pattern for every layer or a mapping from every layer name to its
    own (e.g. ``4:8`` where the input size allows it, ``2:4`` elsewhere). Every layer is
    checked against its pattern before any is pruned; ``options`` go to
    :func:`prune_layer`. Returns the pruned params (same structure) and one
    :class:`LayerReport` per layer.

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.models.mlp import MLP
    >>> model = MLP(num_classes=3, hidden=(8,))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    >>> x = jax.random.normal(jax.random.key(1), (32, 8))
    >>> pruned, report = prune_mlp_sequential(params, x, "wanda", "unstructured", 0.5)
    >>> [(r.name, r.density) for r in report]
    [('fc1', 0.5), ('head', 0.5)]
    """
    names = _mlp_layer_names(params)
    if isinstance(pattern, Mapping):
        if set(pattern) != set(names):
            raise ValueError(f"pattern mapping must name every layer {names}, got "
                             f"{sorted(pattern)}")
        patterns = {name: as_pattern(pattern[name]) for name in names}
    else:
        patterns = dict.fromkeys(names, as_pattern(pattern))
    if method not in POSTTRAIN_METHODS:
        raise ValueError(f"unknown post-training method {method!r}; known: "
                         f"{', '.join(POSTTRAIN_METHODS)}")
    for name in names:  # every layer up front, not after minutes of pruning
        try:
            patterns[name].check_shape(np.shape(params[name]["kernel"]),
                                       where=f"{name}/kernel")
            _density(patterns[name], sparsity)
        except ValueError as error:
            raise ValueError(f"{name}/kernel: {error}" if not str(error).startswith(name)
                             else str(error)) from None
    x = jnp.asarray(calibration_inputs, jnp.float32)
    x = x.reshape(x.shape[0], -1)
    pruned: dict[str, Any] = {}
    report = []
    for index, name in enumerate(names):
        layer = dict(params[name])
        kernel = layer["kernel"]
        try:
            result = prune_layer(method, kernel, x, patterns[name], sparsity, **options)
        except ValueError as error:
            raise ValueError(f"{name}/kernel: {error}") from None
        layer["kernel"] = result.kernel
        pruned[name] = layer
        error = reconstruction_error(kernel, result.kernel, x)
        report.append(LayerReport(name, float(jnp.mean(result.mask)), float(error)))
        if index < len(names) - 1:
            x = _dense(x, layer)
            x = jax.nn.relu(x)
    return pruned, report


@jax.jit
def _dense(x: jax.Array, layer: dict[str, Any]) -> jax.Array:
    y = jnp.matmul(x, layer["kernel"].astype(jnp.float32))
    return y + layer["bias"] if "bias" in layer else y
