"""The controls of an IMP round (:data:`~sparsejax.harness.lottery.config.CONTROLS`):
branches trained beside the ticket with the round's mask, to tell what the ticket's
weights add. ``reinit`` puts the same mask on a fresh random initialisation; ``random_mask``
puts a random mask with the same kept count in every layer (and in every group of a
structured pattern) on the rewind weights. Both controls of a round draw from one key,
:func:`control_key`.
"""

from __future__ import annotations

from typing import Any

import jax

from sparsejax.core.masks import Prunable
from sparsejax.core.patterns import as_pattern
from sparsejax.core.transforms import zero_masked
from sparsejax.harness.lottery.masks import pattern_random_mask
from sparsejax.harness.lottery.trainer import Trainer
from sparsejax.methods.base import SparseState

__all__ = ["control_key", "same_counts_random_mask", "control_start"]

PyTree = Any


def control_key(seed: int, round_index: int) -> jax.Array:
    """The random key of round ``round_index``'s controls in a run of ``seed``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0xC0), round_index)


def same_counts_random_mask(masks: PyTree, rng: jax.Array, prunable: Prunable,
                            pattern: str = "unstructured") -> PyTree:
    """A random mask with the kept count of ``masks`` in every prunable leaf (and in
    every group of a structured ``pattern``)."""
    return pattern_random_mask(as_pattern(pattern), masks, rng, prunable)


def control_start(control: str, trainer: Trainer, start: SparseState,
                  rewind_state: SparseState, masks: PyTree, key: jax.Array,
                  prunable: Prunable, pattern: str = "unstructured") -> SparseState:
    """The state the branch of ``control`` starts from, in the round whose ticket starts
    from ``start`` with ``masks``: ``'reinit'``: those masks on fresh weights drawn with
    ``key`` (the rest of ``start`` kept); ``'random_mask'``: a random mask of the same
    counts, drawn with ``key``, on the weights of ``rewind_state``."""
    if control == "reinit":
        fresh, _ = trainer.init_params(key)
        return start.replace(params=zero_masked(fresh, masks))
    rmasks = same_counts_random_mask(masks, key, prunable, pattern)
    return rewind_state.replace(params=zero_masked(rewind_state.params, rmasks), masks=rmasks)
