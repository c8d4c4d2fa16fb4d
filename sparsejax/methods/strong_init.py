"""Initial weights and scores of the strong-ticket methods (:mod:`sparsejax.methods.strong`,
:func:`sparsejax.gates`).

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
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import path_str
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.methods.draws import NormalDraw, UniformDraw, draw_each

__all__ = [
    "WEIGHT_INITS",
    "FAN_MODES",
    "RELU_GAIN",
    "check_choice",
    "fans",
    "init_weights",
    "init_scores",
    "prunable_paths",
]

PyTree = Any

WeightInit = Literal["model", "kaiming_normal", "signed_constant", "scaled_kaiming_normal",
                     "scaled_signed_constant"]
FanMode = Literal["fan_in", "fan_out"]

WEIGHT_INITS: tuple[str, ...] = ("model", "kaiming_normal", "signed_constant",
                                 "scaled_kaiming_normal", "scaled_signed_constant")
"""Names accepted by ``weight_init``."""
FAN_MODES: tuple[str, ...] = ("fan_in", "fan_out")
RELU_GAIN = math.sqrt(2.0)


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


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _leaf_keys(rng: jax.Array, n: int) -> jax.Array:
    """``fold_in(rng, i)`` for ``i`` in ``range(n)``, stacked, folded in one vmapped call
    (the same keys): on CPU each ``fold_in`` is a loop of its own in the compiled init.
    Stacked, not a list: eagerly, a list of the rows compiles a slice per row."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(n, dtype=jnp.uint32))


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
    check_choice("weight_init", weight_init, WEIGHT_INITS)
    check_choice("fan_mode", fan_mode, FAN_MODES)
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
    redrawn = [i for i, (path, leaf) in enumerate(flat) if prunable(path_str(path), leaf)]
    # one generator for every leaf's normal draw (a program per leaf compiled slowly)
    normals = dict(zip(redrawn, draw_each(NormalDraw(), keys[np.asarray(redrawn, int)],
                                          [jnp.shape(flat[i][1]) for i in redrawn]),
                       strict=True))
    out = []
    for i, ((_, leaf), leaf_density) in enumerate(zip(flat, densities, strict=True)):
        if i not in normals:
            out.append(leaf)
            continue
        fan_in, fan_out = fans(jnp.shape(leaf))
        std = gain / math.sqrt(fan_in if fan_mode == "fan_in" else fan_out)
        if weight_init.startswith("scaled_"):
            if not 0 < float(leaf_density) <= 1:
                raise ValueError(f"scaled inits need densities in (0, 1], got {leaf_density}")
            std = std / math.sqrt(float(leaf_density))
        dtype = jnp.result_type(leaf)
        z = normals[i]
        if weight_init.endswith("kaiming_normal"):
            w = z * jnp.float32(std)
        else:
            w = jnp.where(z >= 0, jnp.float32(std), jnp.float32(-std))
        out.append(w.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def prunable_paths(params: PyTree, prunable: Prunable) -> list[str]:
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
    scored = [i for i, (path, leaf) in enumerate(flat) if prunable(path_str(path), leaf)]
    # one generator for every leaf: units in [0, 1), scaled per leaf as JAX scales them
    units = draw_each(UniformDraw(), keys[np.asarray(scored, int)],
                      [jnp.shape(flat[i][1]) for i in scored])
    scores = {}
    for i, unit in zip(scored, units, strict=True):
        path, leaf = flat[i]
        bound = 1.0 / math.sqrt(fans(jnp.shape(leaf))[0])
        scores[path_str(path)] = UniformDraw(-bound, bound).from_unit(unit)
    return scores
