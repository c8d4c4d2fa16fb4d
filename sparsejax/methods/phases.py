"""Updates whose masks move on a schedule, written once for both forms: the traced
``Method.update`` (a ``lax.cond`` on ``state.step``) and the trainers' two compiled phases
(:class:`~sparsejax.methods.base.MaskPhases`, chosen on the host). An update is written
with :func:`branch` (or the elementwise :func:`select`) on a ``due`` that is traced in
the first form and a Python bool in the second; :func:`scheduled_update` makes both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.methods.base import MaskPhases, SparseState, UpdateFn

__all__ = ["branch", "select", "scheduled_update"]

PyTree = Any


def branch(due: jax.Array | bool, on_due: Callable[[], Any],
           otherwise: Callable[[], Any]) -> Any:
    """``lax.cond(due, on_due, otherwise)``, or just the chosen branch when ``due`` is a
    Python bool, so one update function serves both ``Method.update`` and
    :class:`MaskPhases`.

    >>> import jax.numpy as jnp
    >>> branch(True, lambda: 1, lambda: 2), int(branch(jnp.bool_(False), lambda: 1, lambda: 2))
    (1, 2)
    """
    if isinstance(due, bool):
        return on_due() if due else otherwise()
    return lax.cond(due, on_due, otherwise)


def select(due: jax.Array | bool, on_due: Callable[[], Any],
           otherwise: Callable[[], Any]) -> Any:
    """The elementwise form of :func:`branch`: for a traced ``due`` both are computed and
    every leaf is ``jnp.where(due, on_due_leaf, otherwise_leaf)`` (cheap and fused for
    elementwise work, where a ``lax.cond`` would copy its operands through the branch);
    for a Python bool just the chosen one.

    >>> import jax.numpy as jnp
    >>> select(False, lambda: 1, lambda: 2), select(jnp.bool_(True), lambda: jnp.ones(2),
    ...                                             lambda: jnp.zeros(2))
    (2, Array([1., 1.], dtype=float32))
    """
    if isinstance(due, bool):
        return on_due() if due else otherwise()
    return jax.tree_util.tree_map(lambda a, b: jnp.where(due, a, b), on_due(), otherwise())


def scheduled_update(
    update_with: Callable[..., SparseState],
    due: Callable[[Any], jax.Array | bool],
) -> tuple[UpdateFn, MaskPhases]:
    """``(update, phases)`` from one ``update_with(state, grads, due, **extra_args)`` written with
    :func:`branch`, and ``due(steps_done)`` that answers for a traced counter (an array)
    and for the host's (a Python int, a Python bool): ``update`` asks ``due`` on the
    traced ``state.step + 1``, the phases fix it to ``False`` / ``True``.

    >>> import jax, jax.numpy as jnp
    >>> state = SparseState.create(params={}, rng=jax.random.PRNGKey(0), opt_state=())
    >>> def mark(s, grads, due):  # records whether this update moved the masks
    ...     moved = branch(due, lambda: jnp.bool_(True), lambda: jnp.bool_(False))
    ...     return s.replace(step=s.step + 1, extra={"moved": moved})
    >>> update, phases = scheduled_update(mark, lambda n: n % 2 == 0)
    >>> bool(update(state, None).extra["moved"]), bool(phases.move(state, None).extra["moved"])
    (False, True)
    >>> phases.due(2), phases.due(3)
    (True, False)
    """

    def update(state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
        return update_with(state, grads, due(state.step + 1), **extra_args)

    def train(state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
        return update_with(state, grads, False, **extra_args)

    def move(state: SparseState, grads: PyTree, **extra_args: Any) -> SparseState:
        return update_with(state, grads, True, **extra_args)

    return update, MaskPhases(due=due, train=train, move=move)
