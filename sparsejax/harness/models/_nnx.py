"""Flax NNX models in the harness: :class:`NNXModel` gives a registered NNX module class
the functional ``init``/``apply`` the training harness calls on a model, through
``nnx.split`` and ``nnx.merge``.

The harness keeps a model's weights as a ``params`` pytree beside it (masks, scores and
optimizer states are shaped like it, checkpoints hold it). For an NNX model that tree is
the model's ``nnx.Param`` state as a plain nested dict whose keys are all strings (a list
index ``0`` becomes ``"0"``): ``layers/0/attn/q_proj/kernel`` names the same leaf in the
dict, in ``nnx.state(module)`` and in :func:`sparsejax.posttrain.prune_blocks`' report.
The module itself is built on demand (:meth:`NNXModel.module`, :meth:`NNXModel.merge`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["NNXModel"]


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """An NNX module class and its constructor options (hashable: a static argument of
    ``jax.jit``, equal for equal options, so compiled programs are shared).

    ``init(rng, *inputs)`` builds the module from ``rng`` (the inputs are not needed: an
    NNX module knows its shapes) and returns ``{"params": params}``; ``apply(variables,
    *args, **kwargs)`` merges ``variables["params"]`` into the module and calls it. These
    are the two calls :func:`sparsejax.harness.models.init_model` and
    :func:`~sparsejax.harness.models.apply_model` make on a model. The module class must
    take ``rngs`` as a keyword and hold no state but ``nnx.Param`` variables.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> model = NNXModel(nnx.Linear, (("in_features", 3), ("out_features", 2)))
    >>> params = model.init(jax.random.key(0))["params"]
    >>> sorted(params), model.apply({"params": params}, jnp.ones((4, 3))).shape
    (['bias', 'kernel'], (4, 2))
    """

    cls: type
    options: tuple[tuple[str, Any], ...] = ()

    def module(self, rng: Any) -> Any:
        """A new module, its weights drawn from ``rng`` (a key or an int seed)."""
        from flax import nnx

        return self.cls(**dict(self.options), rngs=nnx.Rngs(rng))

    def init(self, rng: Any, *inputs: Any, **kwargs: Any) -> dict[str, Any]:
        """``{"params": params}`` of a module built from ``rng``; ``inputs`` and
        ``kwargs`` (linen's example inputs, ``train=...``) are ignored."""
        del inputs, kwargs
        return {"params": self.params_of(self.module(rng))}

    def apply(self, variables: Mapping[str, Any], *args: Any, train: bool = False,
              **kwargs: Any) -> Any:
        """The module with ``variables["params"]`` called on ``args`` (``train`` is
        dropped: the registered NNX models have no dropout or batch statistics)."""
        del train
        unknown = set(variables) - {"params"}
        if unknown:
            raise ValueError(f"an NNX model holds params only, got collections {sorted(unknown)}")
        return self.merge(variables["params"])(*args, **kwargs)

    def merge(self, params: Mapping[str, Any]) -> Any:
        """The module with the weights ``params`` (a params dict as :meth:`init` gives)."""
        from flax import nnx

        graphdef, template = self._abstract()
        state = jax.tree.map(lambda leaf: leaf, template)  # new Variables: the cache stays
        nnx.replace_by_pure_dict(state, _native_keys(nnx.to_pure_dict(template), params))
        return nnx.merge(graphdef, state)

    def params_of(self, module: Any) -> dict[str, Any]:
        """The params dict of ``module`` (its ``nnx.Param`` arrays, string keys); a
        ``ValueError`` when it holds other state (batch statistics, RNG counters)."""
        from flax import nnx

        _, params, rest = nnx.split(module, nnx.Param, ...)
        if jax.tree.leaves(rest):
            kinds = sorted({type(v).__name__ for _, v in nnx.to_flat_state(rest)})
            raise ValueError(f"{type(module).__name__} holds state other than nnx.Param "
                             f"({', '.join(kinds)}); the harness trains params only")
        return _string_keys(nnx.to_pure_dict(params))

    @functools.cache  # noqa: B019 - frozen and hashable: one abstract module per model
    def _abstract(self) -> tuple[Any, Any]:
        """The graph definition and the abstract state of the module (nothing computed)."""
        from flax import nnx

        return nnx.split(nnx.eval_shape(lambda: self.module(0)))


def _string_keys(tree: Any) -> Any:
    """A nested dict with every key a string (NNX list indices are ints)."""
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _native_keys(template: Any, tree: Any) -> Any:
    """``tree`` (string keys) with the keys of ``template`` (NNX's: ints for list
    entries); a missing or extra key is a ``ValueError`` naming it."""
    if not isinstance(template, Mapping):
        return tree
    if not isinstance(tree, Mapping) or {str(k) for k in template} != set(tree):
        have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ValueError(f"params do not fit the model: expected keys "
                         f"{sorted(str(k) for k in template)}, got {have}")
    return {k: _native_keys(v, tree[str(k)]) for k, v in template.items()}
