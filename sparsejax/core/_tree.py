"""Small pytree helpers on the current ``jax.tree_util`` key-path API.

Paths are the ones a user sees: a Flax NNX ``Variable`` (``nnx.state(model, nnx.Param)``,
what ``nnx.Optimizer`` hands to ``tx.init``) flattens to its array under one more key,
the attribute ``value``; that key is dropped, so ``head/kernel`` names the same leaf in
a ``State`` of variables and in its pure-array form (``nnx.as_pure``, ``nnx.to_pure_dict``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

KeyPath = tuple[Any, ...]


def key_name(key: Any) -> str:
    """The plain name of one key-path entry (dict key, attribute name or index)."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _is_variable_value(key: Any) -> bool:
    """The last key of a path into a Flax NNX ``Variable``: its ``value`` attribute."""
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def path_str(path: KeyPath) -> str:
    """A key path as a slash-separated string, e.g. ``'Dense_0/kernel'``.

    A trailing ``.value`` attribute key (a Flax NNX ``Variable``'s array) is dropped, so
    an NNX leaf is named as ``nnx.state`` shows it:

    >>> from jax.tree_util import DictKey, GetAttrKey
    >>> path_str((DictKey("head"), DictKey("kernel"), GetAttrKey("value")))
    'head/kernel'
    """
    if path and _is_variable_value(path[-1]):
        path = path[:-1]
    return "/".join(key_name(k) for k in path)


def leaf_paths(tree: Any) -> list[str]:
    """The slash-separated path of every leaf of ``tree``, in flattening order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
    """``tree_map`` whose function also receives the leaf's slash-separated path."""
    return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)


def split_rows(stacks: list[Any], rows_of: list[list[int]],
               shapes: list[tuple[int, ...]]) -> list[Any]:
    """Leaf ``i`` of ``shapes`` from row ``r`` of ``stacks[j]`` where ``rows_of[j][r] ==
    i`` (each stack holding its leaves flattened, one per row, or already the list of its
    leaves: see :func:`leaves_or_stack`); leaves in no stack are ``None``.

    Called eagerly, a row is taken at a runtime index, by one small program per stack
    shape and leaf shape: a compiled program that returned the leaves itself would slice
    each at its own offset, and XLA's CPU backend compiles every such slice as a kernel
    of its own (about 12 ms each, docs/design.md "Compile time"). Traced, the rows are
    plain slices of the caller's program.

    >>> import jax.numpy as jnp
    >>> [x.tolist() for x in split_rows([jnp.arange(6).reshape(2, 3)], [[1, 0]],
    ...                                 [(3,), (1, 3)])]
    [[3, 4, 5], [[0, 1, 2]]]
    """
    out: list[Any] = [None] * len(shapes)
    for stack, ids in zip(stacks, rows_of, strict=True):
        if isinstance(stack, (list, tuple)):
            for i, leaf in zip(ids, stack, strict=True):
                out[i] = leaf
            continue
        traced = isinstance(stack, jax.core.Tracer)
        for row, i in enumerate(ids):
            shape = tuple(shapes[i])
            out[i] = (stack[row].reshape(shape) if traced
                      else _row(stack, np.int32(row), shape))
    return out


@functools.partial(jax.jit, static_argnums=2)
def _row(stack: jax.Array, row: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stack, row, keepdims=False).reshape(shape)


SPLIT_OUTSIDE = 8
"""A compiled program returns a stack of at least this many leaves for :func:`split_rows`
to split eagerly; fewer it splits itself. A row taken eagerly costs one small program
per stack and leaf shape (about 70 ms to compile, measured on ResNet-18's init), a slice
in the program about 12 ms per leaf."""


def leaves_or_stack(stack: Any, ids: list[int], shapes: list[tuple[int, ...]]) -> Any:
    """What a compiled program returns for :func:`split_rows`: the stack (rows of
    flattened leaves ``ids``) as it is when it holds :data:`SPLIT_OUTSIDE` leaves or
    more, else the list of its leaves in their ``shapes``, sliced in the program."""
    if len(ids) >= SPLIT_OUTSIDE:
        return stack
    return [stack[row].reshape(shapes[i]) for row, i in enumerate(ids)]
