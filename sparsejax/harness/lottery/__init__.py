"""The ``sparsejax lottery`` driver: iterative magnitude pruning (IMP) with rewinding, its
controls, and linear-mode-connectivity (instability) analysis.

Procedure (Frankle & Carbin 2019; Frankle et al. 2020). Record the rewind point: ``w_0``,
or for late rewinding the whole training state at step ``k`` (``--rewind 500it`` or
``2ep``). Round 0 trains the dense network. Each later round prunes a fraction of the
surviving weights of the previous round's trained ticket by ``|w|`` (layer-wise or
global; the output layer at its own rate or dense), resets the survivors to the rewind
point and trains again from step ``k`` to the end, with the same learning-rate schedule,
optimizer state and data order as the uninterrupted run. Controls branch off each round
with the round's mask: ``reinit`` (the same mask on a fresh random initialisation) and
``random_mask`` (a random mask with the same kept count in every layer, on the rewind
weights). With a sparsity ``pattern`` (``--pattern 2:4``, ``block:4``, ``channel``) every
round prunes by magnitude within it and the random mask keeps the same counts per group.

The modules, each importing only those above it:

* :mod:`~sparsejax.harness.lottery.masks`: the rules of a round's masks within a sparsity
  pattern, and the kept counts of each round (``round_counts``);
* :mod:`~sparsejax.harness.lottery.config`: :class:`LotteryConfig`, its checks and its run
  folder;
* :mod:`~sparsejax.harness.lottery.pruning`: the ticket's masks of each round
  (:func:`imp_masks`);
* :mod:`~sparsejax.harness.lottery.trainer`: the compiled :class:`Trainer`;
* :mod:`~sparsejax.harness.lottery.controls`: where the control branches start;
* :mod:`~sparsejax.harness.lottery.driver`: the rounds (:func:`run_lottery`), each branch
  checkpointed and resumable;
* :mod:`~sparsejax.harness.lottery.stability`: the instability analysis
  (:func:`instability`);
* :mod:`~sparsejax.harness.lottery.commands`: the ``lottery`` and ``instability``
  subcommands (:func:`add_commands`).
"""

from sparsejax.harness.lottery.commands import add_commands, config_from_args
from sparsejax.harness.lottery.config import (
    CONTROLS,
    LotteryConfig,
    config_hash,
    parse_step,
    run_folder,
)
from sparsejax.harness.lottery.controls import same_counts_random_mask
from sparsejax.harness.lottery.driver import run_lottery
from sparsejax.harness.lottery.masks import round_counts
from sparsejax.harness.lottery.pruning import imp_masks
from sparsejax.harness.lottery.stability import error_barrier, instability, interpolation_errors
from sparsejax.harness.lottery.trainer import Trainer

__all__ = [
    "LotteryConfig",
    "CONTROLS",
    "parse_step",
    "config_hash",
    "run_folder",
    "round_counts",
    "imp_masks",
    "same_counts_random_mask",
    "Trainer",
    "run_lottery",
    "interpolation_errors",
    "error_barrier",
    "instability",
    "config_from_args",
    "add_commands",
]
