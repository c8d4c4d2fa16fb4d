"""Sparse-training methods: one factory per method, all following :class:`Method`.

``get_method(name, optimizer, **options)`` builds a registered method by name; later
families register themselves with :func:`register_method`.
"""

from __future__ import annotations

from sparsejax.methods.base import (
    InitContext,
    MaskPhases,
    Method,
    SparseState,
    apply_optimizer,
    masks_in_state,
    no_penalty,
    step_key,
)
from sparsejax.methods.dense import dense
from sparsejax.methods.fixed import fixed_mask, random_scores, static
from sparsejax.methods.phases import branch, scheduled_update
from sparsejax.methods.registry import METHODS, MethodBuilder, get_method, register_method

__all__ = [
    "InitContext",
    "MaskPhases",
    "Method",
    "SparseState",
    "apply_optimizer",
    "branch",
    "masks_in_state",
    "no_penalty",
    "scheduled_update",
    "step_key",
    "dense",
    "fixed_mask",
    "random_scores",
    "static",
    "METHODS",
    "MethodBuilder",
    "register_method",
    "get_method",
]

register_method("dense", dense)
register_method("static", static)

# Each family module registers its methods when imported.
from sparsejax.methods import dst, gates, pruning, ste, strong  # noqa: E402, F401
