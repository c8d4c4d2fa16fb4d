"""Memory of the train state per method against dense, and the size of masks.

For each method on each model: the bytes of the whole ``SparseState`` (params, masks,
scores, optimizer state) and XLA's own accounting of the compiled train step
(arguments, outputs and temporaries, from ``compiled.memory_analysis()``), each as a
ratio to the dense method; and the bytes of the masks held as bool against the same
masks bit-packed (``np.packbits``), which is how tickets are stored on disk.

    python benchmarks/memory.py --json benchmarks/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from step_time import METHOD_OPTIONS, build, init_state, setup, write_json  # same folder

import sparsejax


def tree_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "conv6"])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_OPTIONS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for model_name in args.models:
        loss_fn, params, model_state, batch = setup(model_name)
        dense_state_bytes = dense_step_bytes = None
        for name in args.methods:
            if name not in sparsejax.METHODS:
                continue
            method = build(name, 10**6)
            state = init_state(method, loss_fn, params, model_state, batch)
            compiled = jax.jit(sparsejax.make_train_step(method, loss_fn)).lower(
                state, batch).compile()
            analysis = compiled.memory_analysis()
            step_bytes = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                             + analysis.temp_size_in_bytes)
            state_bytes = tree_bytes(state)
            if name == "dense":
                dense_state_bytes, dense_step_bytes = state_bytes, step_bytes
            mask_leaves = jax.tree_util.tree_leaves(state.masks)
            row = {
                "method": name, "model": model_name, "state_bytes": state_bytes,
                "step_bytes": step_bytes, "temp_bytes": int(analysis.temp_size_in_bytes),
                "mask_dtypes": sorted({str(m.dtype) for m in mask_leaves}),
                "mask_bytes_bool": tree_bytes(state.masks),
                "mask_bytes_packed": int(sum(np.packbits(np.asarray(m)).nbytes
                                             for m in mask_leaves)),
                "backend": jax.default_backend(),
            }
            if dense_state_bytes:
                row["state_ratio"] = round(state_bytes / dense_state_bytes, 3)
                row["step_ratio"] = round(step_bytes / dense_step_bytes, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
