"""Exact top-k masks without sorting.

``topk_mask`` keeps exactly ``num_kept(density, size)`` entries with the largest scores,
per leaf or jointly across leaves. The search itself (:mod:`sparsejax.core.topk_search`)
counts instead of sorting, which is linear in the number of scores and much faster than
``jnp.sort`` or ``lax.top_k`` on CPU (see docs/design.md and benchmarks/topk.py).

One compiled search serves a whole tree: ``topk_mask`` runs one bitwise search over every
leaf (each leaf, or for a global top-k all leaves together, one segment of the search),
whatever their number and sizes. ``topk_mask_tracked`` runs the sampled search, a few
passes per call, on the leaves of each size stacked as rows: one program per leaf size.

Ties at the k-th largest score are broken deterministically: the entries that come first
(in leaf order, then row-major order) are kept.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core import topk_search
from sparsejax.core._tree import (
    SPLIT_OUTSIDE,
    leaves_or_stack,
    split_rows,
)
from sparsejax.core._tree import (
    explicit_sharding as _explicit_sharding,
)
from sparsejax.core.topk_sampled import sampled_topk
from sparsejax.core.topk_search import (
    SAMPLE_SIZE,
    bitwise_topk,
    key_value,
    kth_largest_keys,
    order_key,
    zero_subnormals,
)
from sparsejax.core.validation import check_density, check_finite, check_same_structure, is_concrete

__all__ = ["num_kept", "topk_mask", "topk_mask_tracked", "kth_largest"]

Scope = Literal["layer", "global"]


def num_kept(density: Any, size: int) -> Any:
    """How many of ``size`` entries a ``density`` keeps: ``floor(density * size + 0.5)``.

    This is the one rounding rule of the library (round half up). With a Python float it
    returns a Python int computed in double precision; with a traced density an int32.

    >>> num_kept(0.5, 5), num_kept(0.1, 235200)
    (3, 23520)
    """
    if is_concrete(density) and not isinstance(density, jax.Array):
        return int(min(size, max(0, math.floor(float(density) * size + 0.5))))
    k = jnp.floor(jnp.asarray(density, jnp.float32) * size + 0.5)
    return jnp.clip(k, 0, size).astype(jnp.int32)


def _replicated(x: Any) -> Any:
    """``x`` resharded to replicated if its type shards it explicitly (else ``x``)."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return x
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def kth_largest(scores: jax.Array, k: Any) -> jax.Array:
    """The exact k-th largest entry of ``scores`` (1-based), as float32, without sorting.

    >>> import jax.numpy as jnp
    >>> float(kth_largest(jnp.array([0.3, -1.0, 2.0, 0.5]), 2))
    0.5
    """
    return _kth_largest_compiled(jnp.asarray(scores), _as_int32(k))


@jax.jit
def _kth_largest_compiled(scores: jax.Array, k: jax.Array) -> jax.Array:
    keys = order_key(jnp.ravel(scores))[None]
    return key_value(kth_largest_keys(keys, jnp.reshape(k, (1, 1))))[0, 0]


def topk_mask(
    scores: Any,
    density: Any = None,
    *,
    count: Any = None,
    scope: Scope = "layer",
    check_finite_scores: bool = True,
    by_magnitude: bool = False,
) -> Any:
    """Boolean mask(s) keeping exactly ``num_kept(density, size)`` (or ``count``) of the
    largest scores.

    Args:
      scores: an array or a pytree of arrays (any real dtype; ranked as float32).
      density: the fraction to keep, in [0, 1]. With ``scope='layer'`` either one number
        for every leaf or a pytree of numbers with the structure of ``scores``; with
        ``scope='global'`` one number for all leaves together.
      count: instead of ``density``, how many entries to keep: an integer (or int array,
        traced or not) per leaf, a tree of them, or one for all leaves with
        ``scope='global'``. Exact for leaves of any size, where a float32 density cannot
        name every count above 2**24 entries. Concrete counts outside [0, size] are an
        error; traced ones are clipped to [0, size].
      scope: ``'layer'`` keeps the top fraction of each leaf; ``'global'`` ranks all
        leaves jointly and keeps ``num_kept(density, total size)`` entries.
      check_finite_scores: raise ``ValueError`` for NaN or inf scores. Under ``jit`` the
        check is a ``checkify`` check that reports the same message when the caller runs
        the program under ``jax.experimental.checkify.checkify``, and adds nothing
        otherwise (no host callback, so the program can be served from JAX's persistent
        compilation cache).
      by_magnitude: rank by ``|score|``: the masks of ``topk_mask(abs(scores))``, the
        absolute values taken as the search's rows are built, with no separate copy
        (Edge-Popup ranks its scores this way every step).

    Returns:
      Boolean arrays with the structure and shapes of ``scores``. Ties at the threshold
      keep the entries that come first (leaf order, then row-major order). Subnormal
      scores rank as zero, as XLA compares them.

    Sharding: inside ``jax.shard_map`` each device ranks its own block of the scores, so
    the top-k (and ``scope='global'``) is per shard: every block keeps exactly
    ``num_kept(density, block size)`` entries, as if ``topk_mask`` ran on each block
    apart. Under ``jit`` on explicitly sharded scores (an ``Explicit`` mesh axis) the
    top-k is global across shards, bitwise equal to the unsharded result: the search
    runs on a replicated copy of the scores and the masks keep the scores' shardings.

    >>> import jax.numpy as jnp
    >>> topk_mask(jnp.array([0.1, 0.9, 0.5, 0.9]), 0.5)
    Array([False,  True, False,  True], dtype=bool)
    >>> topk_mask(jnp.array([1.0, 1.0, 1.0, 1.0]), 0.5)  # ties: first entries win
    Array([ True,  True, False, False], dtype=bool)
    >>> topk_mask(jnp.array([0.1, 0.9, 0.5, 0.9]), count=3)
    Array([False,  True,  True,  True], dtype=bool)
    >>> topk_mask(jnp.array([0.1, -0.9, 0.5, 0.2]), 0.5, by_magnitude=True)
    Array([False,  True,  True, False], dtype=bool)
    """
    return _topk(scores, density, count, scope, check_finite_scores, None, by_magnitude)[0]


def topk_mask_tracked(
    scores: Any,
    density: Any = None,
    cuts: jax.Array | None = None,
    *,
    count: Any = None,
    scope: Scope = "layer",
    check_finite_scores: bool = True,
    by_magnitude: bool = False,
    sampled_above: int | None = None,
) -> tuple[Any, jax.Array]:
    """:func:`topk_mask` for scores that change a little between calls (a per-step top-k
    in training): returns ``(masks, cuts)``; pass ``cuts`` to the next call.

    ``cuts`` has one row ``[cut, how far it moved]`` per group (per leaf, or one for
    ``scope='global'``). The next search starts with two cuts around the previous one
    instead of cuts from a sample: on Edge-Popup's scores only a few entries cross the
    cut between steps, so the first pass brackets a handful of entries and an extraction
    pass settles them. The masks are exactly those of :func:`topk_mask` whatever
    ``cuts`` holds; only the time changes. With ``by_magnitude`` the cuts are on
    ``|score|``. Groups of more than ``sampled_above`` entries (at least ``SAMPLE_SIZE``,
    2048) take the sampled search, a few passes per call but a program compiled once per
    group size; smaller groups share one bitwise search (32 passes, one small program).
    ``None`` takes ``sparsejax.core.topk_search.SAMPLED_ABOVE`` (``2**17``), where the
    passes saved start to outweigh the compile.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (100, 100))
    >>> masks, cuts = topk_mask_tracked(x, 0.3)
    >>> masks2, cuts = topk_mask_tracked(x + 1e-4, 0.3, cuts)
    >>> bool(jnp.all(masks == masks2)), cuts.shape
    (True, (1, 2))
    """
    if sampled_above is None:
        sampled_above = topk_search.SAMPLED_ABOVE
    if (isinstance(sampled_above, bool) or not isinstance(sampled_above, numbers.Integral)
            or sampled_above < SAMPLE_SIZE):
        raise ValueError(f"sampled_above must be an int >= {SAMPLE_SIZE} (groups up to "
                         f"SAMPLE_SIZE entries are always searched bitwise), got "
                         f"{sampled_above!r}")
    return _topk(scores, density, count, scope, check_finite_scores, cuts, by_magnitude,
                 int(sampled_above))


def _topk(scores: Any, density: Any, count: Any, scope: str, check_finite_scores: bool,
          hints: jax.Array | None, by_magnitude: bool = False,
          sampled_above: int = SAMPLE_SIZE) -> tuple[Any, jax.Array]:
    """``(masks, new hints)``: the argument checks and grouping of :func:`topk_mask`."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if (density is None) == (count is None):
        raise ValueError("give exactly one of density and count")
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    if not leaves:
        return scores, jnp.zeros((0, 2), jnp.float32)
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"scores must be real numbers, got dtype {dtype}")
    if check_finite_scores:
        check_finite(scores, "scores")
    amount = density if count is None else count
    n_groups = 1 if scope == "global" else len(leaves)
    if hints is not None and jnp.shape(hints) != (n_groups, 2):
        raise ValueError(f"cuts must have shape ({n_groups}, 2) (one row per "
                         f"{'group' if scope == 'global' else 'leaf'}), got {jnp.shape(hints)}")

    if scope == "global":
        if jnp.ndim(amount) != 0:
            raise ValueError("scope='global' takes one density or count for all leaves")
        total = sum(int(jnp.size(leaf)) for leaf in leaves)
        masks, new_hints = _topk_compiled(leaves, [_as_int32(_kept(density, count, total))],
                                          hints, True, by_magnitude, sampled_above)
        return jax.tree_util.tree_unflatten(treedef, masks), new_hints

    if isinstance(amount, (int, float)) or (hasattr(amount, "ndim") and amount.ndim == 0):
        amounts = [amount] * len(leaves)
    else:
        check_same_structure(scores, amount, reference_name="scores",
                             other_name="densities" if count is None else "counts",
                             check_shapes=False)
        amounts = jax.tree_util.tree_leaves(amount)
        _check_one_amount_per_leaf(amounts, "density" if count is None else "count")
    ks = [_kept(a, None, int(jnp.size(leaf))) if count is None
          else _kept(None, a, int(jnp.size(leaf)))
          for leaf, a in zip(leaves, amounts, strict=True)]
    masks, new_hints = _topk_compiled(leaves, [_as_int32(k) for k in ks], hints, False,
                                      by_magnitude, sampled_above)
    return jax.tree_util.tree_unflatten(treedef, masks), new_hints


def _topk_compiled(leaves: list[jax.Array], ks: list[jax.Array], hints: jax.Array | None,
                   joint: bool, by_magnitude: bool,
                   sampled_above: int) -> tuple[list[jax.Array], jax.Array]:
    """:func:`_topk_groups`, its masks split into leaves (by :func:`split_rows` outside
    the compiled search: called eagerly, no slice per leaf is compiled)."""
    shardings = [_explicit_sharding(leaf) for leaf in leaves]
    shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
    # Traced, every stack comes back whole and split_rows takes each leaf into a buffer
    # of its own; eagerly, stacks of few leaves are sliced in the program.
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(
        (leaves, ks, hints)))
    found, new_hints = _topk_groups(leaves, ks, hints, joint, by_magnitude, sampled_above,
                                    split_inside=not traced)
    if joint:
        row, inside = found
        masks = _split_row(row, [math.prod(shape) for shape in shapes], shapes, inside)
    else:
        masks = split_rows(found, _groups([math.prod(shape) for shape in shapes]), shapes)
    masks = [mask if sharding is None else jax.sharding.reshard(mask, sharding)
             for mask, sharding in zip(masks, shardings, strict=True)]
    return masks, new_hints


def _groups(sizes: list[int]) -> list[list[int]]:
    """The leaves searched as the rows of one array: the leaves of one size, stacked. The
    sampled search (tracked, above ``sampled_above`` entries) compiles once per size; the
    bitwise search takes every group as segments of one array, and a stack of equally
    large leaves costs XLA's CPU backend one kernel where each of them as a piece of that
    array cost a kernel of its own, about 12 ms (docs/design.md, "Compile time")."""
    by_size: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    return list(by_size.values())


def _outside(shapes: list[tuple[int, ...]]) -> list[bool]:
    """Which leaves of a joint search are taken from its row outside its program: those
    whose shape :data:`~sparsejax.core._tree.SPLIT_OUTSIDE` leaves or more share (one
    small program per shape, about 70 ms); the others are sliced in the program (about
    12 ms each)."""
    return [shapes.count(shape) >= SPLIT_OUTSIDE for shape in shapes]


def _split_row(row: jax.Array, sizes: list[int], shapes: list[tuple[int, ...]],
               inside: list[Any]) -> list[jax.Array]:
    """The leaves of a joint search's one row of masks (``(1, sum(sizes))``), where its
    program did not slice them already (``inside[i]``): slices traced, and eagerly spans
    taken at runtime offsets (see :func:`~sparsejax.core._tree.split_rows`)."""
    offsets = np.cumsum([0, *sizes])
    traced = isinstance(row, jax.core.Tracer)
    return [leaf if leaf is not None
            else row[0, offsets[i]:offsets[i + 1]].reshape(shape) if traced
            else _span(row, np.int32(offsets[i]), shape)
            for i, (shape, leaf) in enumerate(zip(shapes, inside, strict=True))]


@functools.partial(jax.jit, static_argnums=2)
def _span(row: jax.Array, offset: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(row[0], offset, math.prod(shape)).reshape(shape)


@functools.partial(jax.jit, static_argnames=("joint", "by_magnitude", "sampled_above",
                                             "split_inside"))
def _topk_groups(leaves: list[jax.Array], ks: list[jax.Array], hints: jax.Array | None,
                 joint: bool, by_magnitude: bool, sampled_above: int,
                 split_inside: bool = True) -> tuple[list[jax.Array], jax.Array]:
    """Masks keeping ``ks[i]`` of each leaf (or, ``joint``, ``ks[0]`` of all leaves
    together) and the new hints, ``[cut, how far it moved]`` per group (``(groups, 2)``).

    Without ``hints`` the search is bitwise, every leaf a segment of one search (32
    counting passes, a small program: a one-off or occasional top-k pays its compile,
    not its passes); with them (a top-k every step, :func:`topk_mask_tracked`) leaves
    of more than ``sampled_above`` entries take the sampled search started from their
    hints, a few passes but a larger program, the leaves of one size as the rows of one
    search. ``by_magnitude`` ranks the absolute values, taken inside the passes.

    Compiled at module level, once per shapes, dtypes and options, so that an eager call
    reuses the program of an earlier one (its loops and branches, built from fresh
    closures, would otherwise be traced and compiled again on every call)."""
    # Explicitly sharded scores (an ``Explicit`` mesh) are searched replicated: the
    # strided sample, the sub-row views and the bitwise search's chunks reshape the whole
    # array, which JAX refuses on a sharded type. The masks come back with
    # the scores' shardings, and are exactly those of the unsharded search.
    if any(_explicit_sharding(leaf) is not None for leaf in leaves):
        leaves = [_replicated(leaf) for leaf in leaves]
        ks = [_replicated(k) for k in ks]
        hints = None if hints is None else _replicated(hints)

    def view(x: jax.Array) -> jax.Array:
        return zero_subnormals(jnp.abs(x) if by_magnitude else x)

    sizes = [int(jnp.size(leaf)) for leaf in leaves]
    flat = [jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves]
    # The groups of leaves searched as the rows of one array: all leaves as one row
    # (joint); else a row per leaf, the leaves of one size stacked (_groups).
    if joint:
        groups = [list(range(len(leaves)))]
        rows, counts = [jnp.concatenate(flat)[None]], [jnp.reshape(ks[0], (1,))]
    else:
        groups = _groups(sizes)
        rows = [jnp.stack([flat[i] for i in g]) for g in groups]
        counts = [jnp.stack([jnp.asarray(ks[i], jnp.int32) for i in g]) for g in groups]
    sampled = [hints is not None and row.shape[1] > sampled_above for row in rows]
    found: list[Any] = [None] * len(groups)
    cuts: list[Any] = [None] * len(groups)
    moved: list[Any] = [None] * len(groups)
    short = [j for j, s in enumerate(sampled) if not s]
    if short:  # one bitwise search for all of them
        for j, masks_j, cut in zip(short, *bitwise_topk(
                [view(rows[j]) for j in short], [counts[j] for j in short]), strict=True):
            found[j], cuts[j], moved[j] = masks_j, cut, jnp.zeros_like(cut)
    for j in (j for j, s in enumerate(sampled) if s):
        hint = hints if joint else hints[np.array(groups[j])]
        found[j], cuts[j] = sampled_topk(rows[j], counts[j], hint, view)
        moved[j] = jnp.abs(cuts[j] - hint[:, 0])
    new_hints = jnp.concatenate([
        jnp.stack([c, jnp.where(jnp.isfinite(m), m, 0.0)], axis=1)
        for c, m in zip(cuts, moved, strict=True)])
    shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
    if joint:  # the row, and the leaves sliced here (None: taken outside)
        offsets, outside = np.cumsum([0, *sizes]), _outside(shapes)
        inside = [None if out else found[0][0, offsets[i]:offsets[i + 1]].reshape(shapes[i])
                  for i, out in enumerate(outside)]
        return [found[0] if any(outside) else None, inside], new_hints
    new_hints = new_hints[np.argsort(np.concatenate(groups), kind="stable")]
    if not split_inside:
        return found, new_hints
    return [leaves_or_stack(f, g, shapes) for f, g in zip(found, groups, strict=True)], new_hints


def topk_rows(xs: list[jax.Array], ks: list[jax.Array]) -> list[jax.Array]:
    """Masks keeping exactly ``ks[i][r]`` of the largest entries of row ``r`` of
    ``xs[i]`` (``(rows_i, n_i)``, ranked as float32; counts int32 ``(rows_i,)``), ties
    to the first: the search of :func:`topk_mask`, one program for all of them, for
    callers that already hold their leaves as rows (the prune-and-regrow engine), so no
    leaf is split out and stacked again between two searches. No finiteness check.

    >>> import jax.numpy as jnp
    >>> topk_rows([jnp.array([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]]), jnp.array([[1.0, 2.0]])],
    ...           [jnp.array([1, 2]), jnp.array([1])])[0]
    Array([[False,  True, False],
           [ True,  True, False]], dtype=bool)
    """
    # Explicitly sharded rows are searched replicated, as in ``_topk_compiled``.
    shardings = [_explicit_sharding(x) for x in xs]
    xs = [zero_subnormals(_replicated(jnp.asarray(x)).astype(jnp.float32)) for x in xs]
    ks = [jnp.clip(_replicated(jnp.asarray(k, jnp.int32)), 0, x.shape[1])
          for x, k in zip(xs, ks, strict=True)]
    return [mask if sharding is None else jax.sharding.reshard(mask, sharding)
            for mask, sharding in zip(bitwise_topk(xs, ks)[0], shardings, strict=True)]


def _as_int32(k: Any) -> Any:
    """A count as an int32 argument of a compiled search: a host value (exact, from
    :func:`num_kept` or a checked ``count``) as a numpy int32, so every value shares one
    program; a traced or device value cast to int32."""
    if is_concrete(k) and not isinstance(k, jax.Array):
        return np.int32(k)
    return jnp.asarray(k, jnp.int32)


def _check_one_amount_per_leaf(amounts: list[Any], what: str) -> None:
    """Raise ``ValueError`` unless each of ``amounts`` (the leaves of a tree of densities
    or counts with the structure of the scores) is one number: an array of them, say
    ``topk_mask(x, jnp.array([0.5, 0.5]))``, would otherwise fail deep in the search."""
    import chex  # imported here: the common call, one number for all leaves, needs none

    # One call for all leaves (a few microseconds); chex numbers them "input i".
    chex.assert_rank(amounts, 0, exception_type=ValueError,
                     custom_message=f"give one {what} per leaf of the scores (input i: the "
                                    f"{what} of leaf i in jax.tree_util.tree_leaves order)")


def _kept(density: Any, count: Any, size: int) -> Any:
    """The number kept of ``size`` entries: ``num_kept(density, size)`` or a checked
    ``count``."""
    if count is None:
        check_density(density)
        return num_kept(density, size)
    if is_concrete(count):
        value = float(np.asarray(count))
        if value != int(value) or not 0 <= value <= size:
            raise ValueError(f"count must be an integer in [0, {size}], got {count!r}")
        return int(value)
    if not jnp.issubdtype(jnp.result_type(count), jnp.integer):
        raise TypeError(f"count must be an integer, got dtype {jnp.result_type(count)}")
    return jnp.clip(jnp.asarray(count, jnp.int32), 0, size)
