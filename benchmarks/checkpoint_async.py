"""Training with a checkpoint every N steps: synchronous saves against async ones.

ResNet-18 (CIFAR-10 shapes, batch 32) trained by RigL at 90% as the training loop runs it
(``SingleDeviceTrainer``); every ``--every`` steps the whole state is saved through
``sparsejax.io.checkpoint.Checkpointer`` (orbax's CheckpointManager), three ways, in turn in
this one process so machine noise hits all alike:

* ``none``: no checkpoint (the baseline);
* ``sync``: ``save`` returns once the checkpoint is committed;
* ``async``: ``save`` returns once the arrays are copied to host memory; the write goes
  on in the background while training continues (the next save waits for it).

Each variant runs ``--steps`` steps per round, ``--rounds`` rounds; the JSON row gives the
median ms per step of each, the save's cost per checkpoint (``(variant - none) x steps /
saves per round``),
the steps each saver holds at the end (``committed_steps``, read back from disk)
and the fraction of the synchronous save that the async one hides. Saves fall every
``--every`` steps but not on a round's last step, so each async write has ``--every``
steps of training to hide behind, as in a run. The state's size is recorded.

    python benchmarks/checkpoint_async.py --json benchmarks/results/checkpoint_async_cpu.json
    python benchmarks/checkpoint_async.py --model lenet300 --steps 20 --every 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from memory import tree_bytes  # same folder
from step_time import build, host, init_state, setup, write_json  # same folder

from sparsejax.engine.parallel import SingleDeviceTrainer
from sparsejax.io.checkpoint import Checkpointer

VARIANTS = ("none", "sync", "async")


def run_round(step: Any, state: Any, batch: Any, steps: int, every: int,
              checkpointer: Checkpointer | None) -> tuple[float, Any]:
    """ms per step over ``steps`` steps, saving every ``every`` but not at the last step
    (so an async write has ``every`` steps to finish inside the round, as it has in
    training), then waiting for the last write: a run's time includes its checkpoints."""
    start = time.perf_counter()
    for i in range(1, steps + 1):
        state, _ = step(state, batch)
        if checkpointer is not None and i % every == 0 and i < steps:
            checkpointer.save(int(state.step), state, {"step": int(state.step)})
    jax.block_until_ready(state)
    if checkpointer is not None:
        checkpointer.wait_until_finished()
    return (time.perf_counter() - start) / steps * 1e3, state


def measure(model: str, method_name: str, steps: int, every: int, rounds: int,
            batch_size: int | None = None, model_options: dict[str, Any] | None = None,
            ) -> dict[str, Any]:
    """One row: ms per step without, with synchronous and with async checkpoints."""
    saves = (steps - 1) // every  # per round (none on the last step)
    if saves < 1:
        raise ValueError(f"--steps {steps} with --every {every} saves nothing: a round needs "
                         "more steps than --every")
    loss_fn, params, model_state, batch = setup(model, batch_size, **(model_options or {}))
    method = build(method_name, 10**6)
    step = SingleDeviceTrainer(method, loss_fn).step
    state = init_state(method, loss_fn, params, model_state, batch)
    _, state = run_round(step, state, batch, 2, every, None)  # compile
    root = Path(tempfile.mkdtemp(prefix="checkpoint_async_"))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        savers = {"none": None,
                  "sync": Checkpointer(root / "sync", max_to_keep=2),
                  "async": Checkpointer(root / "async", max_to_keep=2, async_save=True)}
        for _ in range(rounds):
            for variant in VARIANTS:
                ms, state = run_round(step, state, batch, steps, every, savers[variant])
                times[variant].append(ms)
        # the steps each saver holds at the end (verified on disk), so a row shows that
        # its saves were really written
        committed = {v: saver.all_steps() for v, saver in savers.items() if saver is not None}
        for saver in savers.values():
            if saver is not None:
                saver.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = {v: statistics.median(t) for v, t in times.items()}
    sync_cost = (ms["sync"] - ms["none"]) * steps / saves
    async_cost = (ms["async"] - ms["none"]) * steps / saves
    return {"model": model, "method": method_name, "batch_size": int(batch["image"].shape[0]),
            "state_bytes": tree_bytes(state), "every": every, "steps": steps,
            "saves_per_round": saves, "committed_steps": committed,
            "rounds": rounds, **{f"{v}_ms_per_step": round(ms[v], 3) for v in VARIANTS},
            "sync_save_ms": round(sync_cost, 1), "async_save_ms": round(async_cost, 1),
            "hidden_fraction": round(1 - async_cost / sync_cost, 3) if sync_cost > 0 else None,
            **host()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--method", default="rigl")
    parser.add_argument("--steps", type=int, default=30, help="steps per round and variant")
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--note", default="", help="what else was running")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = measure(args.model, args.method, args.steps, args.every, args.rounds)
    row["note"] = args.note
    print(" ".join(f"{k}={v}" for k, v in row.items() if k not in ("xla_flags",)))
    write_json(args.json, [row])


if __name__ == "__main__":
    main()
