"""SparseGPT against Wanda, per Dense layer of the default GPT: time and peak memory.

Every prunable (Dense) kernel of the default GPT (4 blocks of width 128: ``query``,
``key``, ``value``, ``out`` 128x128, ``fc1`` 128x512, ``fc2`` 512x128 per block, and the
128x65 ``head``) is pruned by ``sparsejax.posttrain.pruners.sparsegpt_prune`` and
``wanda_prune`` from calibration inputs of ``--windows`` x ``--context`` tokens (128 x 64
= 8192 by default, random normal: neither time nor memory depends on the values), at
50% unstructured and 2:4. Per layer, method and pattern:

* ``first_call_ms``  the first call, which compiles (a layer whose shape an earlier
                     layer had reuses that compilation: ``new_shape`` false);
* ``steady_ms``      the median of ``--repeats`` later calls;
* ``compile_s``      lowering and compiling the whole call as one ``jax.jit``;
* ``temp_bytes``, ``argument_bytes``, ``output_bytes`` and their sum ``peak_bytes``
  from that compilation's ``memory_analysis()`` (XLA's own accounting, as in
  ``benchmarks/memory.py``), and ``hessian_bytes`` (``in x in`` float32, SparseGPT's
  one large buffer).

``ratio_to_wanda`` is SparseGPT's steady time (or peak bytes) over Wanda's on the same
layer, pattern and process. Each row also names the device, cores, XLA flags, the load
average when the run started and ``--note`` (say what else was running).

    python benchmarks/posttrain_layers.py --json benchmarks/results/posttrain_layers_cpu.json \\
        --note "nothing else running"
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from sparse_forward import build  # same folder
from step_time import host, write_json
from topk import time_compiled

from sparsejax.core._tree import path_str
from sparsejax.core.masks import default_prunable
from sparsejax.posttrain.pruners import sparsegpt_prune, wanda_prune

METHODS = {"sparsegpt": sparsegpt_prune, "wanda": wanda_prune}


def dense_layers(params: Any) -> list[tuple[str, jax.Array]]:
    """``(path, kernel)`` of every prunable 2-D leaf, in the params' order."""
    return [(path_str(path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if default_prunable(path_str(path), leaf) and np.ndim(leaf) == 2]


def measure(method: str, kernel: jax.Array, inputs: jax.Array, pattern: str,
            sparsity: float, repeats: int) -> dict[str, Any]:
    """Time and memory of one method on one layer (see the module's docstring)."""
    prune = METHODS[method]

    def call(k: jax.Array, x: jax.Array) -> Any:
        return prune(k, x, pattern, sparsity)

    start = time.perf_counter()
    jax.block_until_ready(call(kernel, inputs))
    first_ms = (time.perf_counter() - start) * 1e3
    steady_ms = time_compiled(lambda: call(kernel, inputs).kernel, repeats)
    start = time.perf_counter()
    compiled = jax.jit(call).lower(kernel, inputs).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    row = {"first_call_ms": round(first_ms, 3), "steady_ms": round(steady_ms, 3),
           "compile_s": round(compile_s, 3)}
    if analysis is not None:
        sizes = {"temp_bytes": int(analysis.temp_size_in_bytes),
                 "argument_bytes": int(analysis.argument_size_in_bytes),
                 "output_bytes": int(analysis.output_size_in_bytes)}
        row.update(sizes, peak_bytes=sum(sizes.values()))
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=128, help="calibration windows")
    parser.add_argument("--context", type=int, default=64, help="tokens per window")
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5, help="steady calls (median)")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers")
    parser.add_argument("--tiny", action="store_true", help="a tiny GPT (a smoke test)")
    parser.add_argument("--note", default="", help="what else was running on the machine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    _, params, _ = build("gpt", args.tiny)
    layers = dense_layers(params)[: args.layers]
    tokens = args.windows * args.context
    common = {"tokens": tokens, "inputs": "random normal", "sparsity": args.sparsity,
              "repeats": args.repeats,
              "load_average_1m": round(os.getloadavg()[0], 2), "note": args.note, **host()}
    rng = np.random.default_rng(0)
    seen: set[tuple[Any, ...]] = set()
    rows = []
    for path, kernel in layers:
        n_in, n_out = kernel.shape
        inputs = jax.numpy.asarray(rng.normal(size=(tokens, n_in)), jax.numpy.float32)
        for pattern in args.patterns:
            pair = {}
            for method in METHODS:
                key = (method, pattern, kernel.shape)
                row = {"layer": path, "shape": [n_in, n_out], "method": method,
                       "pattern": pattern, "new_shape": key not in seen,
                       "hessian_bytes": n_in * n_in * 4 if method == "sparsegpt" else 0,
                       **measure(method, kernel, inputs, pattern, args.sparsity,
                                 args.repeats), **common}
                seen.add(key)
                pair[method] = row
                rows.append(row)
            ratio = {"ratio_to_wanda": round(pair["sparsegpt"]["steady_ms"]
                                             / pair["wanda"]["steady_ms"], 2)}
            if "peak_bytes" in pair["wanda"]:
                ratio["peak_ratio_to_wanda"] = round(pair["sparsegpt"]["peak_bytes"]
                                                     / pair["wanda"]["peak_bytes"], 2)
            pair["sparsegpt"].update(ratio)
            print(f"{path:22s} {n_in:4d}x{n_out:<4d} {pattern:12s} sparsegpt "
                  f"{pair['sparsegpt']['steady_ms']:9.2f} ms (first "
                  f"{pair['sparsegpt']['first_call_ms']:8.1f})  wanda "
                  f"{pair['wanda']['steady_ms']:8.2f} ms (first "
                  f"{pair['wanda']['first_call_ms']:8.1f})  {ratio}", flush=True)
    for pattern in args.patterns:
        for method in METHODS:
            chosen = [r for r in rows if r["pattern"] == pattern and r["method"] == method]
            print(f"all layers, {pattern}, {method}: steady "
                  f"{sum(r['steady_ms'] for r in chosen):.1f} ms, first calls "
                  f"{sum(r['first_call_ms'] for r in chosen) / 1e3:.2f} s", flush=True)
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
