"""Random numbers for the methods, drawn so that XLA compiles them cheaply: flat
(:func:`draw_flat`), one generator per leaf shape (:func:`draws_per_leaf`), and computed
once where one value feeds a fused loop per layer (:func:`computed_once`). Each gives the
numbers of the plain call bit for bit; docs/design.md, "Compile time", says why each is
needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["computed_once", "draw_flat", "draws_per_leaf"]


def computed_once(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, computed into a buffer of its own in a compiled program: run as
    ``lax.cond(p, fn, fn, *args)`` on a predicate ``p`` that XLA cannot fold (a bit of
    the first argument). XLA fuses a cheap elementwise producer into each of its
    consumers; where one value (a random draw, a mean over every layer) feeds a fused loop
    per layer, its code is copied into every one of them and the program grows with the
    number of layers, or with its square. ``jax.lax.optimization_barrier`` does not stop
    this on CPU (XLA removes it before fusing). Both branches are ``fn``: the result is
    ``fn(*args)`` bit for bit, whichever runs (the bit comes from the first non-empty
    array in ``args``; with none, ``fn`` is called as it is). Under ``vmap`` with a
    batched first argument the ``cond`` becomes a select and ``fn`` runs twice.

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
    return jax.lax.cond(bit.astype(jnp.uint32) & 1 == 0, fn, fn, *args)


def draw_flat(draw: Callable[[jax.Array, tuple[int, ...]], jax.Array], key: jax.Array,
              shape: tuple[int, ...]) -> jax.Array:
    """``draw(key, shape)`` drawn as ``draw(key, (size,))`` and reshaped: the same numbers
    (JAX's threefry generator counts the flat index either way), in a program XLA
    compiles several times faster when ``shape`` has several dimensions (on this
    project's CPU a normal draw of ``(3, 3, 512, 512)`` compiled in 1.18 s, of
    ``(2359296,)`` in 0.27 s; ResNet-18's twelve kernel shapes, 9.7 s against 3.0 s).

    >>> import jax
    >>> key = jax.random.PRNGKey(0)
    >>> bool((draw_flat(jax.random.normal, key, (3, 4)) == jax.random.normal(key, (3, 4))).all())
    True
    """
    shape = tuple(shape)
    return draw(key, (math.prod(shape),)).reshape(shape)


def draws_per_leaf(key: jax.Array, shapes: list[tuple[int, ...]],
                   draw: Callable[[jax.Array, tuple[int, ...]], jax.Array],
                   include: list[bool] | None = None) -> list[jax.Array | None]:
    """``draw(split(key, len(shapes))[i], shapes[i])`` for every leaf ``i`` (``None``
    where ``include[i]`` is False). The leaves of one shape draw in one vmapped call,
    which gives the same numbers as one call each, so the compiled program holds one
    random-bits generator per shape rather than one per leaf, each drawn flat
    (:func:`draw_flat`).

    >>> import jax
    >>> a, b = draws_per_leaf(jax.random.PRNGKey(0), [(3,), (3,)], jax.random.uniform)
    >>> bool((a == jax.random.uniform(jax.random.split(jax.random.PRNGKey(0), 2)[0],
    ...                               (3,))).all())
    True
    """
    keys = jax.random.split(key, max(len(shapes), 1))
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        if include is None or include[i]:
            by_shape.setdefault(tuple(shape), []).append(i)
    draws: list[jax.Array | None] = [None] * len(shapes)
    for shape, ids in by_shape.items():
        drawn = computed_once(lambda ks, shape=shape: jax.vmap(
            lambda k: draw_flat(draw, k, shape))(ks), keys[jnp.array(ids)])
        for row, i in enumerate(ids):
            draws[i] = drawn[row]
    return draws
