"""Linear mode connectivity (instability) analysis of a lottery run (:func:`instability`):
two copies of a round's network trained from the rewind point with two data orders, and
the test error along the straight line between them (:func:`interpolation_errors`); the
instability is its barrier (:func:`error_barrier`). Frankle et al. 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from sparsejax.core.masks import sparsity_report
from sparsejax.core.transforms import zero_masked
from sparsejax.core.validation import check_int, is_int
from sparsejax.harness.lottery.config import (
    LotteryConfig,
    check_out,
    check_same_run,
    run_folder,
)
from sparsejax.harness.lottery.driver import run_lottery, train_branch
from sparsejax.harness.lottery.trainer import Trainer
from sparsejax.harness.provenance import provenance
from sparsejax.io.checkpoint import Checkpointer
from sparsejax.io.files import read_json, write_json
from sparsejax.methods.base import SparseState

__all__ = ["interpolation_errors", "error_barrier", "instability"]


def interpolation_errors(trainer: Trainer, state_a: SparseState, state_b: SparseState,
                         alphas: Sequence[float]) -> list[float]:
    """Test error of ``(1 - a) * w_A + a * w_B`` (under A's masks) for each ``a``."""
    errors = []
    for a in alphas:
        params = jax.tree_util.tree_map(lambda x, y, a=a: (1 - a) * x + a * y,
                                        state_a.params, state_b.params)
        errors.append(1.0 - trainer.accuracy(state_a.replace(params=params)))
    return errors


def error_barrier(errors: Sequence[float]) -> float:
    """Instability: the largest error along the path above the mean of its two ends.

    >>> round(error_barrier([0.02, 0.10, 0.04]), 6)
    0.07
    """
    return float(max(errors) - 0.5 * (errors[0] + errors[-1]))


def _check_round_was_run(root: Path, round_index: int) -> None:
    """Raise ``ValueError`` unless round ``round_index`` (>= 1) has finished in ``root``
    (round 0, the dense run, is trained on demand)."""
    if not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"--round must be an integer >= 0, got {round_index!r}")
    if round_index == 0 or (root / f"round_{round_index:02d}" / "ticket" / "result.json").exists():
        return
    finished = sorted(int(p.parent.parent.name.removeprefix("round_"))
                      for p in root.glob("round_*/ticket/result.json"))
    raise ValueError(f"--round {round_index} was not run: {root} holds the finished "
                     f"rounds {finished}; run "
                     f"'sparsejax lottery --rounds {round_index}' with the same options first")


def _check_instability_options(data_seeds: Sequence[int], num_alphas: int) -> None:
    """Raise ``ValueError`` for ``--data-seeds`` that are not two different seeds or an
    ``--alphas`` that cannot hold both ends of the line."""
    seeds = list(data_seeds)
    if len(seeds) != 2:
        raise ValueError(f"--data-seeds takes two seeds, got {len(seeds)}")
    for seed in seeds:
        check_int(seed, "--data-seeds", minimum=0, maximum=2**32 - 1)
    if seeds[0] == seeds[1]:
        raise ValueError(
            f"--data-seeds {seeds[0]} {seeds[1]} are equal: both copies would see the same "
            "data order and end identical, so the barrier between them would be 0 and "
            "measure nothing; give two different seeds (default 101 102)")
    if not is_int(num_alphas) or num_alphas < 2:
        raise ValueError(
            f"--alphas must be an integer >= 2 (the points evaluated on the line between the "
            f"two copies, both ends included; default 11), got {num_alphas!r}")


def instability(config: LotteryConfig, round_index: int = 0, *, data_seeds: Sequence[int] = (
        101, 102), num_alphas: int = 11, trainer: Trainer | None = None) -> dict[str, Any]:
    """Linear mode connectivity at the config's rewind step: two copies of the round's
    network (masks of ``round_index``, which must be finished) trained from the rewind
    point to the end with the data orders of ``data_seeds``, and the test error along the
    straight line between them. Results are cached in the run folder.

    Raises ``ValueError`` for equal ``data_seeds`` (two identical copies: a barrier of 0
    that measures nothing) and for ``num_alphas`` below 2 (the line's two ends)."""
    _check_instability_options(data_seeds, num_alphas)
    root = run_folder(config)
    check_out(root, config)
    check_same_run(root, config)
    _check_round_was_run(root, round_index)
    trainer = trainer or Trainer(config)
    folder = root / "instability" / f"round_{round_index:02d}_seeds_{data_seeds[0]}_" \
                                    f"{data_seeds[1]}"
    result_path = folder / "result.json"
    if result_path.exists():
        return read_json(result_path, "an instability result")
    init_state = trainer.initial_state()
    k = trainer.rewind_step
    if round_index == 0 and not (root / "round_00" / "ticket" / "result.json").exists():
        run_lottery(dataclasses.replace(config, rounds=0, controls=()), verbose=False,
                    trainer=trainer)
    masks = init_state.masks
    if round_index:
        with Checkpointer(root / f"round_{round_index:02d}" / "ticket" / "checkpoints") as c:
            _, ticket, _ = c.restore(init_state)
        masks = jax.device_get(ticket.masks)
    if k:
        with Checkpointer(root / "rewind", max_to_keep=1) as ckpt:
            _, rewind_state, _ = ckpt.restore(init_state)
    else:
        rewind_state = init_state
    start = rewind_state.replace(params=zero_masked(rewind_state.params, masks), masks=masks)
    copies = [train_branch(trainer, folder / f"copy_{s}", start, data_seed=s)[1]
              for s in data_seeds]
    alphas = [i / (num_alphas - 1) for i in range(num_alphas)]
    errors = interpolation_errors(trainer, copies[0], copies[1], alphas)
    density = float(sparsity_report(jax.device_get(
        trainer.method.effective_params(copies[0])))[-1].density)
    result = {"round": round_index, "rewind_step": k, "density": density,
              "data_seeds": list(data_seeds), "alphas": alphas, "errors": errors,
              "barrier": error_barrier(errors), "config": dataclasses.asdict(config),
              "provenance": provenance()}
    write_json(result_path, result)
    return result
