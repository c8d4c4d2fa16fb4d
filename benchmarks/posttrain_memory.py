"""Peak memory of pruning the LLaMA-style model block by block, against the model's own
size plus one block's activations.

Each case runs in a fresh child process: the NNX ``llama`` of the model zoo (default
size: 4 layers, width 128, 4 heads, 2 key/value heads, MLP 352, context 64; vocabulary
65, tinyshakespeare's) with random weights, ``--windows`` random token windows of 64,
pruned by :func:`sparsejax.posttrain.prune_blocks` (SparseGPT, 50% unstructured, every
``layers/i``, ``batch_size`` windows at a time). What is measured is the host's resident
memory (Linux ``/proc/self/status``; the CPU backend keeps its arrays there): the peak
(``VmHWM``) during one call minus the resident memory just before it, the peak reset
before the call by writing 5 to ``/proc/self/clear_refs``. The first call (``cold``)
includes XLA's compilations; the second (``warm``) is the pruning itself. glibc is told
to map every allocation over 1 MiB (``MALLOC_MMAP_THRESHOLD_``), so a freed buffer
leaves the resident set at once and the next call starts from what is really held.

The reference (``expected_bytes``) is what block-by-block pruning must hold: the model's
params (``params_bytes``; the pruned copy it returns is as large again: ``2 x``), one
block's inputs and outputs for the whole calibration set (``block_io_bytes``, ``2 x
windows x 64 x 128 x 4``), one block's forward on one batch as XLA's compiled-program
accounting gives it (``block_batch_bytes``: arguments, outputs and temporaries; the
MLP's and attention's intermediates), and the Hessians of one block (``hessian_bytes``:
``d x d`` for q/k/v, o and gate/up, ``352 x 352`` for down). A peak that grew with the
depth, or held the whole model's activations, would show against it: the cases vary
the depth (4, 8 layers) and the calibration set (512, 1024 windows).

    python benchmarks/posttrain_memory.py --json benchmarks/results/posttrain_memory.json \\
        --other-load "what else runs on the machine"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

VOCAB, CONTEXT = 65, 64
CASES = ((4, 512), (8, 512), (4, 1024))  # (n_layer, windows)


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_of(call: Any) -> tuple[Any, int, int]:
    """``call()``'s result, the resident bytes before it and its peak above them."""
    import jax

    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    result = jax.block_until_ready(call())
    return result, before, _status("VmHWM") - before


def child(n_layer: int, windows: int, batch_size: int) -> dict[str, Any]:
    """One case, in this process: sizes, the reference and the measured peaks."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparsejax.harness.models import get_model
    from sparsejax.posttrain.blocks import prune_blocks

    model = get_model("llama", VOCAB, n_layer=n_layer)
    params = model.init(jax.random.key(0))["params"]
    module = model.merge(params)
    tokens = jax.random.randint(jax.random.key(1), (windows, CONTEXT), 0, VOCAB)
    n_embd = module.embed_tokens.embedding.shape[1]
    hidden = module.layers[0].mlp.down_proj.kernel.shape[0]

    # XLA's accounting of one block's forward on one batch
    graphdef, state = nnx.split(module.layers[0])
    x = jnp.zeros((batch_size, CONTEXT, n_embd), jnp.float32)

    def block(state: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x, jnp.arange(CONTEXT))

    analysis = jax.jit(block).lower(state, x).compile().memory_analysis()
    block_batch = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      + analysis.temp_size_in_bytes)
    params_bytes = int(sum(leaf.nbytes for leaf in jax.tree.leaves(params)))
    block_io = 2 * windows * CONTEXT * n_embd * 4
    hessians = (3 * n_embd ** 2 + hidden ** 2) * 4

    def prune() -> Any:
        pruned, _ = prune_blocks(module, None, tokens, "sparsegpt", "unstructured", 0.5,
                                 blocks=module.block_paths(), batch_size=batch_size)
        return nnx.state(pruned, nnx.Param)

    _, rss_cold, cold = _peak_of(prune)
    _, rss_warm, warm = _peak_of(prune)
    expected = 2 * params_bytes + block_io + block_batch + hessians
    return {"benchmark": "posttrain_memory", "model": "llama", "n_layer": n_layer,
            "n_embd": n_embd, "mlp_hidden": hidden, "context": CONTEXT, "windows": windows,
            "batch_size": batch_size, "method": "sparsegpt", "sparsity": 0.5,
            "params_bytes": params_bytes, "block_io_bytes": block_io,
            "block_batch_bytes": block_batch, "hessian_bytes": hessians,
            "expected_bytes": expected, "rss_before_cold_bytes": rss_cold,
            "cold_peak_bytes": cold, "rss_before_warm_bytes": rss_warm,
            "warm_peak_bytes": warm, "warm_ratio_to_expected": round(warm / expected, 3),
            "backend": jax.default_backend()}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--other-load", default="", help="what else runs on the machine")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", nargs=3, type=int, metavar=("N_LAYER", "WINDOWS", "BATCH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    rows = []
    for n_layer, windows in CASES:
        load = [round(x, 2) for x in os.getloadavg()]
        out = subprocess.run([sys.executable, __file__, "--child", str(n_layer), str(windows),
                              str(args.batch_size)], env=env, capture_output=True, text=True,
                             check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row.update(other_load=args.other_load, load_average_start=load,
                   load_average_end=[round(x, 2) for x in os.getloadavg()])
        rows.append(row)
        mib = 1 << 20
        print(f"{n_layer} layers, {windows} windows: warm peak {row['warm_peak_bytes'] / mib:.1f}"
              f" MiB against expected {row['expected_bytes'] / mib:.1f} MiB (params "
              f"{row['params_bytes'] / mib:.1f}, block io {row['block_io_bytes'] / mib:.1f}, "
              f"block batch {row['block_batch_bytes'] / mib:.1f}); cold peak "
              f"{row['cold_peak_bytes'] / mib:.1f} MiB", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
