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
import jax.numpy as jnp
import numpy as np

from sparsejax.core.topk_search import vary, varying_axes

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
    slices of the caller's program, each into a buffer of its own (:func:`computed_once`):
    XLA would fuse a leaf's slice into each of its consumers, kernels that differ by
    their offset and compile one by one, where consumers of buffers are one kernel per
    shape.

    >>> import jax.numpy as jnp
    >>> [x.tolist() for x in split_rows([jnp.arange(6).reshape(2, 3)], [[1, 0]],
    ...                                 [(3,), (1, 3)])]
    [[3, 4, 5], [[0, 1, 2]]]
    """
    out: list[Any] = [None] * len(shapes)
    whole = []  # the stacks still to split, with their leaves' ids
    for stack, ids in zip(stacks, rows_of, strict=True):
        if isinstance(stack, (list, tuple)):
            for i, leaf in zip(ids, stack, strict=True):
                out[i] = leaf
        else:
            whole.append((stack, ids))

    def rows(*taken: jax.Array) -> list[jax.Array]:
        return [stack[row].reshape(tuple(shapes[i])) for stack, (_, ids) in zip(
            taken, whole, strict=True) for row, i in enumerate(ids)]

    taken = [stack for stack, _ in whole]
    if not any(isinstance(stack, jax.core.Tracer) for stack in taken):
        leaves = [_row(stack, np.int32(row), tuple(shapes[i]))
                  for stack, ids in whole for row, i in enumerate(ids)]
    elif any(explicit_sharding(stack) is not None for stack in taken):
        leaves = rows(*taken)  # computed_once reads an entry, which a sharded type refuses
    else:
        leaves = computed_once(rows, *taken)
    for i, leaf in zip([i for _, ids in whole for i in ids], leaves, strict=True):
        out[i] = leaf
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


def computed_once(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, computed into a buffer of its own in a compiled program: run as
    ``lax.cond(p, fn, zeros, *args)`` on a predicate ``p`` that is always true but that
    XLA cannot fold (``(b | 1) != 0`` for a bit ``b`` of the first argument). XLA fuses a
    cheap elementwise producer into each of its consumers; where one value (a random
    draw, a mean over every layer) feeds a fused loop per layer, its code is copied into
    every one of them and the program grows with the number of layers, or with its
    square. ``jax.lax.optimization_barrier`` does not stop this on CPU (XLA removes it
    before fusing). The result is ``fn(*args)`` bit for bit: the other branch (zeros)
    never runs, and a compiler that folded ``p`` would keep ``fn``. (With ``fn`` in both
    branches, as this was first written, XLA compiled ``fn`` twice.) Under ``vmap`` with
    a batched first argument the ``cond`` becomes a select of ``fn``'s result and zeros.
    With no non-empty array in ``args``, ``fn`` is called as it is.

    >>> import jax.numpy as jnp
    >>> float(computed_once(lambda x: x.sum(), jnp.arange(4.0)))
    6.0
    """
    sized = [leaf for leaf in jax.tree_util.tree_leaves(args) if jnp.size(leaf) > 0]
    if not sized:
        return fn(*args)
    first = sized[0]
    if jax.dtypes.issubdtype(first.dtype, jax.dtypes.prng_key):
        first = jax.random.key_data(first)
    bit = jnp.ravel(first)[0]
    if jnp.issubdtype(bit.dtype, jnp.floating):
        bit = jax.lax.bitcast_convert_type(bit.astype(jnp.float32), jnp.uint32)
    shapes = jax.eval_shape(fn, *args)

    axes = varying_axes(args)

    def zeros(*_: Any) -> Any:
        # Inside shard_map the zeros vary over the mesh axes the arguments (so fn's
        # result) vary over.
        return jax.tree_util.tree_map(lambda s: vary(jnp.zeros(s.shape, s.dtype), axes),
                                      shapes)

    return jax.lax.cond((bit.astype(jnp.uint32) | jnp.uint32(1)) != 0, fn, zeros, *args)


def explicit_sharding(x: Any) -> Any:
    """The sharding in the type of ``x`` when it shards some axis explicitly (under
    ``jit``, on an ``Explicit`` mesh), else ``None``."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(p is None for p in spec):
        return None
    return sharding
