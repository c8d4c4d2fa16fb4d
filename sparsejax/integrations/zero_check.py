"""Whether the pruned weights that :func:`sparsejax.sparse_tx` zeroes stay zero in the
user's params: a check inside the updates, refused masks on the host, and a warning when
a chain puts transformations after it (see docs/design.md, "The optax form").

A mask update sets newly pruned weights to zero through the update ``-p``; a
transformation after ``sparse_tx`` in ``optax.chain`` (``scale``, ``reduce_on_plateau``,
``add_decayed_weights``, a clip) changes that update, and nothing ``sparse_tx`` returns
survives an unknown transformation of its output. So the update after every mask move,
and every :data:`EVERY`-th, counts the pruned weights that are non-zero in the params it
is given (:func:`checked`, no host callback), and :func:`sparsejax.masks_of` refuses to
report masks the params escaped (:func:`raise_if_escaped`).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["EVERY", "ZeroCheck", "fresh_check", "checked", "raise_if_escaped", "warn_if_followed"]

PyTree = Any


EVERY = 16
"""Besides the update after every mask move, every ``EVERY``-th update checks too (a
leak that some other transformation makes on an ordinary step)."""


class ZeroCheck(NamedTuple):
    """What :func:`sparsejax.sparse_tx` found when it checked that the pruned weights it
    zeroed are still zero in the params of a later update (:func:`checked`).

    Attributes:
      checks_from: int32, the first update (by ``step``) that may check: 1 after
        ``init`` (the first step may come before :func:`sparsejax.zero_pruned`),
        ``step + 1`` after :func:`sparsejax.replace_masks`.
      due: bool, whether the next update checks: the previous one moved the masks (or
        zeroed weights as the first update does), so a transformation after sparse_tx
        may have left some behind.
      escaped: int32, how many pruned weights were non-zero at the first update that
        found any (0: none so far).
      escaped_at: int32, that update's ``step`` (-1: none so far).
    """

    checks_from: jax.Array
    due: jax.Array
    escaped: jax.Array
    escaped_at: jax.Array


def fresh_check(checks_from: int | jax.Array = 1) -> ZeroCheck:
    """A :class:`ZeroCheck` that has found nothing and checks from update ``checks_from``.

    >>> int(fresh_check().escaped_at)
    -1
    """
    return ZeroCheck(checks_from=jnp.asarray(checks_from, jnp.int32),
                     due=jnp.zeros((), bool), escaped=jnp.zeros((), jnp.int32),
                     escaped_at=jnp.full((), -1, jnp.int32))


def checked(state: Any, params: PyTree, moves: jax.Array | bool) -> ZeroCheck:
    """``state.zero_check`` after this update (at ``state.step``, which moves the masks if
    ``moves``): it counts the weights ``state.masks`` prune that are non-zero in
    ``params`` if the previous update moved the masks (the weights it zeroed are then
    where a transformation after sparse_tx leaves them) or every :data:`EVERY` updates,
    until it first finds some. The count is one pass over the params inside a
    ``lax.cond`` that the other updates skip; no host callback."""
    check = state.zero_check
    step = state.step
    may = (step >= check.checks_from) & (check.escaped_at < 0)
    now = may & (check.due | (step % EVERY == 0))

    def count() -> jax.Array:
        counts = [jnp.sum(jnp.logical_and(jnp.logical_not(m), p != 0), dtype=jnp.int32)
                  for m, p in zip(jax.tree_util.tree_leaves(state.masks),
                                  jax.tree_util.tree_leaves(params), strict=True)]
        return sum(counts, jnp.zeros((), jnp.int32))

    escaped = jax.lax.cond(now, count, lambda: jnp.zeros((), jnp.int32))
    first = escaped > 0
    # An update that is not checked zeroes weights too (the first one, and the one after
    # replace_masks): the next one checks, as after a mask move.
    due = jnp.logical_or(moves, step < check.checks_from)
    return check._replace(due=due, escaped=jnp.where(first, escaped, check.escaped),
                          escaped_at=jnp.where(first, step, check.escaped_at))


def raise_if_escaped(state: Any) -> None:
    """Raise if ``state`` records pruned weights found non-zero (eager values only: under
    a trace the record is an array the caller reads later)."""
    check = state.zero_check
    if isinstance(check.escaped_at, jax.core.Tracer):
        return
    # One record, or one per device of a replicated (pmap) state.
    at, escaped = np.ravel(check.escaped_at), np.ravel(check.escaped)
    if not np.any(at >= 0):
        return
    first = int(np.argmax(at >= 0))
    raise ValueError(
        f"sparse_tx: {int(escaped[first]):,} pruned weights were non-zero in the params given "
        f"to update {int(at[first])}, so the params are not as sparse as these masks. "
        "Something changed sparse_tx's updates after it: a transformation after it in "
        "optax.chain (optax.scale, reduce_on_plateau, add_decayed_weights, "
        "clip_by_global_norm, keep_pruned_zero, ...) scales the updates that set newly "
        "pruned weights to zero; or the params were changed outside the optimizer. Put "
        "such transformations inside it: sparse_tx(method, optax.chain(optimizer, ...)); or "
        "keep them after and zero the pruned weights after every step: params = "
        "sparsejax.zero_pruned(params, opt_state)")


def _followers(node: Any, is_state: Callable[[Any], bool]) -> tuple[bool, list[str]]:
    """Whether ``node`` holds a sparse_tx state, and the state types of the
    transformations that come after one in an ``optax.chain`` (whose state is a plain
    tuple, one entry per transformation). ``optax.masked`` states are left out: a masked
    transformation after it usually trains other leaves (the biases)."""
    if is_state(node):
        return True, []
    if isinstance(node, dict):
        children = list(node.values())
    elif isinstance(node, (list, tuple)):  # a chain, or a NamedTuple state around one
        children = list(node)
    else:
        return False, []
    is_chain = not hasattr(node, "_fields")
    holds, after = False, []
    for i, child in enumerate(children):
        child_holds, child_after = _followers(child, is_state)
        after += child_after
        if child_holds:
            holds = True
            if is_chain:
                after += [type(c).__name__ for c in children[i + 1:]
                          if not isinstance(c, optax.MaskedState)]
    return holds, after


def warn_if_followed(opt_state: PyTree, states: list[Any],
                     is_state: Callable[[Any], bool]) -> None:
    """Before the first step (every state in ``states`` at step 0), warn if transformations
    follow a sparse_tx state (``is_state``) in a chain of ``opt_state`` (already pure)."""
    if any(isinstance(s.step, jax.core.Tracer) or np.any(np.asarray(s.step) != 0)
           for s in states):
        return
    _, after = _followers(opt_state, is_state)
    if after:
        warnings.warn(
            f"optax.chain runs {len(after)} transformation(s) after sparse_tx (their states: "
            f"{', '.join(after)}): one that scales or adds to the updates (optax.scale, "
            "reduce_on_plateau, add_decayed_weights, clip_by_global_norm, ...) moves the "
            "weights a mask update prunes off zero. Put them inside: sparse_tx(method, "
            "optax.chain(optimizer, ...)); or keep them after and zero the pruned weights "
            "after every step: params = sparsejax.zero_pruned(params, opt_state). "
            "sparsejax.masks_of raises once pruned weights were found non-zero.",
            UserWarning, stacklevel=3)
