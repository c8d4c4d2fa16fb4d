"""The ticket's masks of each IMP round (:func:`imp_masks`): prune the smallest ``|w|``
among the previous round's survivors, layer by layer or by one global threshold, the
output layer at its own rate, like the others or dense (:func:`output_filter`); within a
structured pattern the rules of :mod:`sparsejax.harness.lottery.masks` apply.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from sparsejax.core._tree import leaf_paths
from sparsejax.core.distributions import select_masks
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import as_pattern
from sparsejax.harness.lottery.config import LotteryConfig
from sparsejax.harness.lottery.masks import pattern_imp_masks, round_counts
from sparsejax.methods.pruning import exclude_pruned, magnitude_scores

__all__ = ["output_filter", "imp_masks"]

PyTree = Any


def output_filter(config: LotteryConfig) -> tuple[Prunable, str | None]:
    """The prunable filter and the output layer's regex (``None`` when it is dense or
    pruned like the others)."""
    pattern = rf"^{re.escape(config.output_layer)}/.*"
    if config.output_fraction == 0:
        def prunable(path: str, leaf: Any) -> bool:
            return default_prunable(path, leaf) and not re.fullmatch(pattern, path)
        return prunable, None
    return default_prunable, (pattern if config.output_fraction is not None else None)


def imp_masks(config: LotteryConfig, params: PyTree, masks: PyTree, round_index: int
              ) -> PyTree:
    """The masks of ``round_index`` (>= 1): prune the smallest ``|w|`` among the survivors
    ``masks`` of the trained ``params`` down to the kept counts of that round.

    >>> import jax.numpy as jnp
    >>> cfg = LotteryConfig(epochs=1, prune_fraction=0.5, output_fraction=None)
    >>> p = {"fc": {"kernel": jnp.array([[1.0, -4.0], [3.0, 2.0]])}}
    >>> m = {"fc": {"kernel": jnp.ones((2, 2), bool)}}
    >>> imp_masks(cfg, p, m, 1)["fc"]["kernel"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """
    prunable, output = output_filter(config)
    if not as_pattern(config.pattern).ranks_globally:
        return pattern_imp_masks(
            as_pattern(config.pattern), params, masks, round_index, prunable,
            lambda p: config.output_fraction if output and re.fullmatch(output, p)
            else config.prune_fraction)
    paths = leaf_paths(params)
    leaves = jax.tree_util.tree_leaves(params)
    sizes = {p: int(np.size(leaf)) for p, leaf in zip(paths, leaves, strict=True)
             if prunable(p, leaf)}
    is_output = {p: bool(output and re.fullmatch(output, p)) for p in sizes}
    overrides: dict[str, float] = {}
    fixed_kept = 0
    for p, n in sizes.items():
        if is_output[p]:
            count = round_counts(n, config.output_fraction, round_index)
        elif config.distribution == "uniform":
            count = round_counts(n, config.prune_fraction, round_index)
        else:
            continue
        overrides[f"^{re.escape(p)}$"] = count / n
        fixed_kept += count
    pooled = sum(n for p, n in sizes.items() if f"^{re.escape(p)}$" not in overrides)
    kept = round_counts(pooled, config.prune_fraction, round_index) + fixed_kept
    total = sum(sizes.values())
    density = kept / total if total else 1.0
    scores = exclude_pruned(magnitude_scores(params), masks)
    return select_masks(scores, density, "global", prunable=prunable, overrides=overrides)
