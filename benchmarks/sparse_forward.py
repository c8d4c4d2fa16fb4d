"""Inference forward of a masked model from sparse kernels against the dense forward.

For LeNet-300-100 (batch 256 of 784 inputs) and the default GPT (4 blocks of width 128,
context 64; batch 16 windows of 64 tokens), with magnitude masks on every Dense kernel:

* ``dense``        the masked kernels as ordinary dense arrays (``model.apply``);
* ``bcoo``         ``jax.experimental.sparse.BCOO`` kernels (``sparsejax.io.export``), at
                   each unstructured sparsity of ``--sparsities`` and at 2:4;
* ``nm_packed``    the packed N:M form (values and uint8 positions, a gather-based
                   product), at 2:4;
* ``nm_unpacked``  the same stored form, unpacked to a dense kernel inside the
                   forward, then a dense product (``nm_product='unpack'``).

Each forward is jitted and run through ``sparsejax.io.export.sparse_apply``; its output is
checked against the dense masked forward. Timings are medians over ``--repeats`` rounds,
each round timing a block of ``--block`` calls of every variant in turn, so machine noise
hits all alike; ``ratio`` is the variant's time over the dense forward's of the same
model in the same process. ``kernel_bytes`` is what the Dense kernels take stored in
that form (``bytes_ratio`` against dense float32), a gain even where time is not.
Each JSON row also names the device, the cores and XLA flags, the load average when the
model's rows started, and ``--note`` (say what else was running).

    python benchmarks/sparse_forward.py --json benchmarks/results/sparse_forward_cpu.json \\
        --note "nothing else running"
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from memory import tree_bytes  # same folder
from step_time import host, write_json
from topk import time_compiled

from sparsejax.core.masks import apply_masks, prunable_leaves
from sparsejax.core.patterns import pattern_mask
from sparsejax.harness.models import get_model
from sparsejax.io.export import sparse_apply, sparse_params

# model -> (get_model options, input shape of one example, batch size); --tiny: small ones
MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...], int]] = {
    "lenet300": ({}, (784,), 256),
    "gpt": ({"num_classes": 65}, (64,), 16),
}
TINY: dict[str, tuple[dict[str, Any], tuple[int, ...], int]] = {
    "lenet300": ({"width": 0.08}, (16,), 4),
    "gpt": ({"num_classes": 16, "n_layer": 1, "n_embd": 16, "n_head": 2, "context": 8},
            (8,), 2),
}


def build(name: str, tiny: bool) -> tuple[Any, Any, jax.Array]:
    """``(model, params, inputs)``: the model from key 0 and one fixed random batch."""
    options, shape, batch = (TINY if tiny else MODELS)[name]
    options = dict(options)
    num_classes = options.pop("num_classes", 10)
    model = get_model(name, num_classes, **options)
    dtype = jnp.int32 if name == "gpt" else jnp.float32
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, *shape), dtype))["params"]
    rng = np.random.default_rng(0)
    if name == "gpt":
        inputs = jnp.asarray(rng.integers(0, num_classes, (batch, *shape)), jnp.int32)
    else:
        inputs = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    return model, params, inputs


@functools.partial(jax.jit, static_argnames=("pattern", "density"))
def magnitude_masks(params: Any, pattern: str, density: float | None) -> Any:
    """Masks keeping the largest ``|w|`` of every prunable leaf in ``pattern``."""
    return jax.tree_util.tree_map(
        lambda p, prunable: pattern_mask(jnp.abs(p), pattern, density) if prunable
        else jnp.ones(p.shape, bool), params, prunable_leaves(params))


def kernel_bytes(params: Any, stored: Any) -> int:
    """Bytes of the prunable leaves of ``stored`` (params in some form)."""
    per_leaf = jax.tree_util.tree_map(lambda keep, leaf: tree_bytes(leaf) if keep else 0,
                                      prunable_leaves(params), stored)
    return int(sum(jax.tree_util.tree_leaves(per_leaf)))


def variants(sparsities: list[float]) -> list[tuple[str, str, float]]:
    """``(form, mask pattern, sparsity)`` of every sparse variant."""
    rows = [("bcoo", "unstructured", s) for s in sparsities]
    return rows + [("bcoo", "2:4", 0.5), ("nm_packed", "2:4", 0.5),
                   ("nm_unpacked", "2:4", 0.5)]


def model_rows(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, params, inputs = build(name, args.tiny)
    load = os.getloadavg()[0]
    dense_fn = jax.jit(lambda v, x: model.apply(v, x))
    sparse_fns = {product: jax.jit(lambda v, x, product=product: sparse_apply(
        model, v, x, nm_product=product)) for product in ("gather", "unpack")}
    calls: dict[str, Any] = {"dense": (dense_fn, {"params": params})}
    dense_bytes = kernel_bytes(params, params)
    meta: dict[str, dict[str, Any]] = {"dense": {"form": "dense", "pattern": "none",
                                                 "sparsity": 0.0, "kernel_bytes": dense_bytes}}
    for form, pattern, sparsity in variants(args.sparsities):
        key = f"{form}-{pattern}-{sparsity:g}"
        masks = magnitude_masks(params, pattern,
                                None if pattern != "unstructured" else 1.0 - sparsity)
        stored = sparse_params(jax.device_get(params), jax.device_get(masks),
                               "bcoo" if form == "bcoo" else pattern)
        expected = dense_fn({"params": apply_masks(params, masks)}, inputs)
        sparse_fn = sparse_fns["unpack" if form == "nm_unpacked" else "gather"]
        got = sparse_fn({"params": stored}, inputs)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4,
                                   atol=1e-4, err_msg=f"{name} {key}")
        calls[key] = (sparse_fn, {"params": stored})
        meta[key] = {"form": form, "pattern": pattern, "sparsity": sparsity,
                     "kernel_bytes": kernel_bytes(params, stored)}
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(args.repeats):
        for key, (fn, variables) in calls.items():
            times[key].append(time_compiled(lambda fn=fn, v=variables: fn(v, inputs),
                                            args.block))
    dense_ms = statistics.median(times["dense"])
    rows = []
    for key, info in meta.items():
        ms = statistics.median(times[key])
        rows.append({"model": name, **info, "batch": int(inputs.shape[0]),
                     "input_shape": list(inputs.shape), "ms": round(ms, 4),
                     "dense_ms": round(dense_ms, 4), "ratio": round(ms / dense_ms, 3),
                     "dense_kernel_bytes": dense_bytes,
                     "bytes_ratio": round(info["kernel_bytes"] / dense_bytes, 3),
                     "load_average_1m": round(load, 2), "note": args.note,
                     "repeats": args.repeats, "block": args.block, **host()})
        stored = info["kernel_bytes"]
        print(f"{name:8s} {key:24s} {ms:9.3f} ms  ratio {ms / dense_ms:6.2f}  "
              f"kernel bytes {stored:>9,d} ({stored / dense_bytes:.2f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9, 0.95])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (median taken)")
    parser.add_argument("--block", type=int, default=10, help="calls per variant per round")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a smoke test)")
    parser.add_argument("--note", default="", help="what else was running on the machine")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [row for name in args.models for row in model_rows(name, args)]
    write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
