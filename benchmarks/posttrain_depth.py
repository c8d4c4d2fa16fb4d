"""Time to prune a GPT against its depth: block by block against the model-level driver.

A GPT (``sparsejax.harness.models.gpt.GPT``, ``--width`` wide, 2 heads, ``--context``
tokens) with 4, 8 and 16 blocks is pruned by SparseGPT at 50% unstructured from
``--windows`` random token windows (the values do not change the time), the head dense,
by three drivers:

* ``prune_blocks``       the calibration set run once to the first block, then block by
                         block on cached activations (``within="block_inputs"``, the
                         reference code's form);
* ``prune_blocks_seq``   the same with ``within="sequential"`` (IST's true-sequential
                         inside each block: one partial block forward per layer group);
* ``prune_sequential``   today's model-level driver: the model re-run from its input for
                         every group of layers (query/key/value, out, fc1, fc2).

Per row: ``cold_s``, the whole call after ``jax.clear_caches()`` (what a user pays once:
its compilations included), and ``warm_s``, the median of ``--repeats`` more calls (the
compiled programs cached), each also as this process's CPU time (``cold_cpu_s``,
``warm_cpu_s``: on one pinned core, what the other jobs' load does not inflate).
``max_abs_diff_to_sequential`` checks that
``prune_blocks_seq`` gives ``prune_sequential``'s kernels. Each row also names the
device, the cores the process may use, the load average before and after, the busiest
other processes (command names and %CPU from ``ps``) and ``--note``: other engineers' jobs
run on this machine, so pin the process to one core and say so.

    taskset -c 0 python benchmarks/posttrain_depth.py \\
        --json benchmarks/results/posttrain_depth.json --note "pinned with taskset -c 0"
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from step_time import host, write_json  # same folder

from sparsejax.core.masks import default_prunable
from sparsejax.harness.models.gpt import GPT
from sparsejax.posttrain.blocks import prune_blocks
from sparsejax.posttrain.sequential import prune_sequential

VOCAB = 65


def _blocks_only(name: str, leaf: Any) -> bool:
    """prune_sequential's filter for the layers prune_blocks prunes: the head dense."""
    return name.startswith("block") and default_prunable(name, leaf)


def drivers(model: GPT, n_layer: int) -> dict[str, Any]:
    blocks = [f"block{i}" for i in range(1, n_layer + 1)]
    return {
        "prune_blocks": lambda p, t: prune_blocks(model, p, t, "sparsegpt", "unstructured",
                                                  0.5, blocks=blocks),
        "prune_blocks_seq": lambda p, t: prune_blocks(model, p, t, "sparsegpt", "unstructured",
                                                      0.5, blocks=blocks, within="sequential"),
        "prune_sequential": lambda p, t: prune_sequential(model, p, t, "sparsegpt",
                                                          "unstructured", 0.5,
                                                          prunable=_blocks_only),
    }


def busiest_processes(count: int = 6) -> list[str]:
    """The ``count`` busiest processes other than this one: ``'%CPU command'``."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,pcpu=,comm=", "--sort=-pcpu"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    return [f"{cpu}% {comm}" for pid, cpu, comm in rows if int(pid) != os.getpid()][:count]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls (median)")
    parser.add_argument("--note", default="", help="what else was running; how it was pinned")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    common = {"benchmark": "posttrain_depth", "method": "sparsegpt", "pattern": "unstructured",
              "sparsity": 0.5, "width": args.width, "context": args.context,
              "windows": args.windows, "repeats": args.repeats, "note": args.note,
              "load_average_start": [round(x, 2) for x in os.getloadavg()],
              "busiest_processes_start": busiest_processes(), **host()}
    tokens = jax.random.randint(jax.random.key(1), (args.windows, args.context), 0, VOCAB)
    rows = []
    for n_layer in args.depths:
        model = GPT(num_classes=VOCAB, n_layer=n_layer, n_embd=args.width, n_head=2,
                    context=args.context)
        params = jax.jit(model.init)(jax.random.key(0),
                                     jnp.zeros((1, args.context), jnp.int32))["params"]
        results = {}
        for name, run in drivers(model, n_layer).items():
            jax.clear_caches()
            start, cpu = time.perf_counter(), time.process_time()
            results[name] = jax.block_until_ready(run(params, tokens)[0])
            cold, cold_cpu = time.perf_counter() - start, time.process_time() - cpu
            warm, warm_cpu = [], []
            for _ in range(args.repeats):
                start, cpu = time.perf_counter(), time.process_time()
                jax.block_until_ready(run(params, tokens)[0])
                warm.append(time.perf_counter() - start)
                warm_cpu.append(time.process_time() - cpu)
            row = {"n_layer": n_layer, "driver": name, "cold_s": round(cold, 3),
                   "warm_s": round(statistics.median(warm), 3),
                   "cold_cpu_s": round(cold_cpu, 3),
                   "warm_cpu_s": round(statistics.median(warm_cpu), 3),
                   "pruned_layers": 6 * n_layer, **common}
            rows.append(row)
            print(f"{n_layer:3d} blocks  {name:17s} cold {cold:8.2f} s ({cold_cpu:.2f} CPU)  "
                  f"warm {row['warm_s']:8.2f} s ({row['warm_cpu_s']:.2f} CPU)", flush=True)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
            jax.tree.leaves(results["prune_blocks_seq"]),
            jax.tree.leaves(results["prune_sequential"]), strict=True))
        for row in rows[-3:]:
            row["max_abs_diff_to_sequential"] = diff
            row["ratio_to_prune_blocks_warm"] = round(row["warm_s"] / rows[-3]["warm_s"], 2)
    for row in rows:
        row["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        row["busiest_processes_end"] = busiest_processes()
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
