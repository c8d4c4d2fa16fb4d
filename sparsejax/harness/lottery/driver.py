"""The IMP round driver (:func:`run_lottery`): the dense round 0, which records the rewind
point, then each round's ticket and controls, every branch trained to the end by
:func:`train_branch`.

Round ``r >= 1`` prunes the previous round's trained ticket
(:func:`~sparsejax.harness.lottery.pruning.imp_masks`), resets the survivors to the rewind
point and trains again from step ``k`` to the end, with the same learning-rate schedule,
optimizer state and data order as the uninterrupted run (the state at ``k`` is restored
whole, with the new masks; pruned weights are zero and stay zero); its controls
(:mod:`sparsejax.harness.lottery.controls`) branch off with the round's mask. Every branch
of every round checkpoints once per epoch (atomic, verified); a killed run resumes at the
round and step it reached, and a finished branch is read back, not retrained.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax

from sparsejax.core.masks import format_sparsity_report, sparsity_report
from sparsejax.core.transforms import zero_masked
from sparsejax.harness.lottery.config import (
    LotteryConfig,
    check_out,
    check_same_run,
    run_folder,
)
from sparsejax.harness.lottery.controls import control_key, control_start
from sparsejax.harness.lottery.pruning import imp_masks, output_filter
from sparsejax.harness.lottery.trainer import Trainer
from sparsejax.harness.provenance import provenance
from sparsejax.io.checkpoint import Checkpointer
from sparsejax.io.files import read_json, write_json
from sparsejax.methods.base import SparseState

__all__ = ["train_branch", "run_lottery"]


def train_branch(trainer: Trainer, folder: Path, start: SparseState, *,
                 data_seed: int | None = None, rewind_to: Path | None = None,
                 extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], SparseState]:
    """Train one branch from ``start`` to the end (resuming from its checkpoints) and
    return ``(result, final state)``; a finished branch is read back, not retrained."""
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "result.json"
    with Checkpointer(folder / "checkpoints", max_to_keep=1) as checkpointer:
        if result_path.exists() and checkpointer.latest_step() == trainer.total_steps:
            _, state, _ = checkpointer.restore(start)
            return read_json(result_path, "a lottery branch's result"), state
        state = start
        if checkpointer.latest_step() is not None:
            _, state, _ = checkpointer.restore(start)
        started = time.time()
        rewind_ckpt = Checkpointer(rewind_to, max_to_keep=1) if rewind_to else None
        curve: list[tuple[int, float]] = []

        def boundary(st: SparseState) -> None:
            step = int(st.step)
            if rewind_ckpt is not None and step == trainer.rewind_step:
                rewind_ckpt.save(step, st)
            if step % trainer.batches_per_epoch == 0 or step == trainer.total_steps:
                curve.append((step, trainer.accuracy(st)))
                checkpointer.save(step, st)

        try:
            state = trainer.train(state, trainer.total_steps, data_seed, boundary,
                                  boundaries=[trainer.rewind_step] if rewind_ckpt else [])
        finally:
            if rewind_ckpt is not None:
                rewind_ckpt.close()
        effective = jax.device_get(trainer.method.effective_params(state))
        rows = sparsity_report(effective)
        result = {
            "test_accuracy": trainer.accuracy(state),
            "density": rows[-1].density,
            "sparsity": rows[-1].sparsity,
            "layers": [{"path": r.path, "kept": r.kept, "size": r.size, "density": r.density}
                       for r in rows[:-1] if r.prunable],
            "report": format_sparsity_report(rows),
            "curve": curve,
            "seconds": time.time() - started,
            "provenance": provenance(),
            **(extra or {}),
        }
        write_json(result_path, result)
        return result, state


def run_lottery(config: LotteryConfig, *, verbose: bool = True,
                trainer: Trainer | None = None) -> dict[str, Any]:
    """Run (or resume, or read back) IMP with rewinding; returns the per-round results and
    writes ``summary.json`` in the run folder."""
    root = run_folder(config)
    check_out(root, config)
    check_same_run(root, config)
    trainer = trainer or Trainer(config)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", {k: v for k, v in dataclasses.asdict(config).items()})
    prunable, _ = output_filter(config)
    init_state = trainer.initial_state()
    k = trainer.rewind_step
    rounds: list[dict[str, Any]] = []

    # Round 0: dense; records the rewind point when it passes step k.
    rewind_dir = root / "rewind"
    result, trained = train_branch(trainer, root / "round_00" / "ticket", init_state,
                                   rewind_to=rewind_dir if k else None, extra={"round": 0})
    if k:
        with Checkpointer(rewind_dir, max_to_keep=1) as ckpt:
            _, rewind_state, _ = ckpt.restore(init_state)
    else:
        rewind_state = init_state
    rounds.append({"round": 0, "ticket": result})
    if verbose:
        _print_round(0, result, {})
    masks = init_state.masks
    for r in range(1, config.rounds + 1):
        masks = jax.device_get(imp_masks(config, trained.params, masks, r))
        start = rewind_state.replace(params=zero_masked(rewind_state.params, masks),
                                     masks=masks)
        folder = root / f"round_{r:02d}"
        result, trained = train_branch(trainer, folder / "ticket", start, extra={"round": r})
        entry: dict[str, Any] = {"round": r, "ticket": result}
        controls: dict[str, Any] = {}
        wanted = config.control_rounds is None or r in config.control_rounds
        for control in config.controls if wanted else ():
            branch_start = control_start(control, trainer, start, rewind_state, masks,
                                         control_key(config.seed, r), prunable, config.pattern)
            controls[control], _ = train_branch(trainer, folder / control, branch_start,
                                                extra={"round": r})
        entry.update(controls)
        rounds.append(entry)
        if verbose:
            _print_round(r, result, controls)
    summary = {"config": dataclasses.asdict(config), "folder": str(root),
               "rewind_step": k, "total_steps": trainer.total_steps,
               "rounds": [{"round": e["round"], "density": e["ticket"]["density"],
                           "ticket": e["ticket"]["test_accuracy"],
                           **{c: e[c]["test_accuracy"] for c in config.controls if c in e}}
                          for e in rounds],
               "provenance": provenance()}
    write_json(root / "summary.json", summary)
    return summary


def _print_round(r: int, result: dict[str, Any], controls: dict[str, Any]) -> None:
    extra = "".join(f"  {c} {v['test_accuracy']:.4f}" for c, v in controls.items())
    print(f"round {r:2d}: {100 * result['density']:6.2f}% remaining  "
          f"ticket {result['test_accuracy']:.4f}{extra}", file=sys.stderr)
    print(result["report"], file=sys.stderr)
