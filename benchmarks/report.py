"""Markdown tables for docs/benchmarks.md from the JSON rows of the benchmarks.

    python benchmarks/report.py benchmarks/results/topk_cpu.json \
        benchmarks/results/step_time_*_cpu.json benchmarks/results/memory_cpu.json

Each file is recognised by its rows: ``algorithm`` (topk.py), ``total_s`` (compile_time.py),
``form`` (own_loop.py),
``case`` (eager_calls.py), ``ratio`` (step_time.py), ``state_bytes`` (memory.py) or
``variant`` (gates_breakdown.py). Step-time rows of every
file are gathered into one table with a column pair per model, with the issue's target
beside each method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"static": "<= 1.05", "magnitude": "<= 1.05", "snip": "<= 1.05",
           "set": "<= 1.10", "rigl": "<= 1.10", "snfs": "<= 1.10",
           "edge_popup": "<= 1.3", "biprop": "<= 1.3", "gates": "<= 1.2"}


def topk_table(rows: list[dict]) -> str:
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    sizes = sorted({r["size"] for r in rows})
    out = ["| n | " + " | ".join(algorithms) + " |", "| --- |" + " --- |" * len(algorithms)]
    for size in sizes:
        cells = []
        for name in algorithms:
            row = next((r for r in rows if r["size"] == size and r["algorithm"] == name), None)
            cells.append("not run" if row is None
                         else f"{row['ms']:.3f} ms ({row['ns_per_score']:.1f} ns)")
        out.append(f"| {size:.0e} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def step_table(rows: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | target | " + " | ".join(
        f"{m}: dense / method ms | ratio" for m in models) + " |"
    out = [head, "| --- | --- |" + " --- | --- |" * len(models)]
    for method in methods:
        cells = []
        for model in models:
            row = next((r for r in rows if r["model"] == model and r["method"] == method), None)
            if row is None:
                cells += ["not run", ""]
                continue
            digits = 3 if row["dense_ms"] < 10 else 0
            cells += [f"{row['dense_ms']:.{digits}f} / {row['method_ms']:.{digits}f}",
                      f"{row['ratio']:.3f}"]
        out.append(f"| {method} | {TARGETS.get(method, '')} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def memory_table(rows: list[dict]) -> str:
    out = ["| model | method | state bytes | ratio | compiled step bytes | ratio |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['state_bytes']:,} | "
                   f"{r['state_ratio']} | {r['step_bytes']:,} | {r['step_ratio']} |")
    return "\n".join(out)


def checkpoint_table(rows: list[dict]) -> str:
    out = ["| model | method | checkpoint every | no checkpoint ms/step | sync ms/step | "
           "async ms/step | save cost hidden |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['every']} | "
                   f"{r['none_ms_per_step']:.1f} | {r['sync_ms_per_step']:.1f} | "
                   f"{r['async_ms_per_step']:.1f} | {r['hidden_fraction']:.2f} |")
    return "\n".join(out)


def sparse_forward_table(rows: list[dict]) -> str:
    out = ["| model | form | pattern | sparsity | ms | ratio | kernel bytes ratio |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['form']} | {r['pattern']} | {r['sparsity']:g} | "
                   f"{r['ms']:.3f} | {r['ratio']:.3f} | {r['bytes_ratio']:.3f} |")
    return "\n".join(out)


def posttrain_table(rows: list[dict]) -> str:
    out = ["| layer | shape | method | pattern | steady ms | ratio to Wanda | compile s | "
           "peak bytes |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['layer']} | {tuple(r['shape'])} | {r['method']} | {r['pattern']} | "
                   f"{r['steady_ms']:.2f} | {r.get('ratio_to_wanda', '')} | "
                   f"{r['compile_s']:.2f} | {r['peak_bytes']:,} |")
    return "\n".join(out)


def depth_table(rows: list[dict]) -> str:
    """posttrain_depth.py: seconds to prune a GPT against its depth, per driver."""
    out = ["| blocks | driver | cold s (CPU s) | warm s (CPU s) | warm ratio to prune_blocks |",
           "| --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['n_layer']} | {r['driver']} | {r['cold_s']:.2f} "
                   f"({r.get('cold_cpu_s', float('nan')):.2f}) | {r['warm_s']:.2f} "
                   f"({r.get('warm_cpu_s', float('nan')):.2f}) | "
                   f"{r['ratio_to_prune_blocks_warm']:.2f} |")
    return "\n".join(out)


def breakdown_table(rows: list[dict]) -> str:
    out = ["| model | variant | dense ms | method ms | ratio |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['variant']} | {r['dense_ms']} | {r['method_ms']} | "
                   f"{r['ratio']:.3f} |")
    return "\n".join(out)


def own_loop_table(rows: list[dict]) -> str:
    out = ["| model | method | form | user's dense ms | method ms | ratio | target |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        digits = 3 if r["dense_ms"] < 10 else 0
        how = f" (update every {r['update_interval']}, {r['amortize']})" if r.get(
            "update_interval") else ""
        out.append(f"| {r['model']} | {r['method']}{how} | {r['form']} | "
                   f"{r['dense_ms']:.{digits}f} | {r['method_ms']:.{digits}f} | "
                   f"{r['ratio']:.3f} | {TARGETS.get(r['method'], '')} |")
    return "\n".join(out)


def compile_table(rows: list[dict]) -> str:
    """compile_time.py: seconds to lower and compile each method's step per model (and
    the ratio to the plain optax step of the same model), then the SparseGPT and CLI rows."""
    steps = [r for r in rows if r.get("form") in ("optax", "native")]
    models = list(dict.fromkeys(r["model"] for r in steps))
    methods = list(dict.fromkeys(r["method"] for r in steps))
    out = ["| method | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for method in methods:
        cells = []
        for model in models:
            row = next((r for r in steps if r["model"] == model and r["method"] == method),
                       None)
            cells.append("not run" if row is None
                         else f"{row['total_s']:.2f} s ({row['ratio_to_plain']:.2f}x)")
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    kernels = [r for r in rows if r.get("form") == "posttrain"]
    if kernels:
        out += ["", "| SparseGPT kernel | pattern | compile s |", "| --- | --- | --- |"]
        out += [f"| {r['model'][7:]} | {r['method'][10:]} | {r['total_s']:.2f} |"
                for r in kernels]
    cli = [r for r in rows if r.get("form") == "cli"]
    if cli:
        out += ["", "| sparsejax train, LeNet-300-100 | persistent cache | to first step |",
                "| --- | --- | --- |"]
        out += [f"| --method {r['method']} | {r['cache']} | {r['first_step_s']:.2f} s |"
                for r in cli]
    return "\n".join(out)


def eager_table(rows: list[dict]) -> str:
    out = ["| call | first (compiles) | second (compiles) | third (compiles) |",
           "| --- | --- | --- | --- |"]
    for r in rows:
        if "first_step_s" in r:
            out.append(f"| CLI to its first step | {r['first_step_s']:.2f} s | |")
            continue
        third = (f"{r['third_s'] * 1e3:.1f} ms ({r['third_compiles']})" if "third_s" in r
                 else "")
        out.append(f"| {r['case']} | {r['first_s']:.3f} s ({r['first_compiles']}) | "
                   f"{r['second_s'] * 1e3:.1f} ms ({r['second_compiles']}) | {third} |")
    return "\n".join(out)


def optax_baseline_table(rows: list[dict]) -> str:
    """The rows timed with ``--optax-baseline``: each method against the engine's dense
    step and against the user's own plain optax dense step of the same model."""
    out = ["| model | method | engine dense ms | user's optax dense ms | method ms | "
           "ratio to engine dense | ratio to user's optax dense | target |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['dense_ms']:.3f} | "
                   f"{r['optax_dense_ms']:.3f} | {r['method_ms']:.3f} | {r['ratio']:.3f} | "
                   f"{r['ratio_to_optax']:.3f} | {TARGETS.get(r['method'], '')} |")
    return "\n".join(out)


def posttrain_memory_table(rows: list[dict]) -> str:
    """benchmarks/posttrain_memory.py: peak resident memory of prune_blocks (warm: the
    pruning; cold: with its compilations) against params + one block's activations."""
    mib = 1 << 20
    out = ["| model | layers | windows | params MiB | block io MiB | block batch MiB | "
           "expected MiB | warm peak MiB | ratio | cold peak MiB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r['n_layer']} | {r['windows']} | "
                   f"{r['params_bytes'] / mib:.1f} | {r['block_io_bytes'] / mib:.1f} | "
                   f"{r['block_batch_bytes'] / mib:.1f} | {r['expected_bytes'] / mib:.1f} | "
                   f"{r['warm_peak_bytes'] / mib:.1f} | {r['warm_ratio_to_expected']:.2f} | "
                   f"{r['cold_peak_bytes'] / mib:.1f} |")
    return "\n".join(out)


def main(paths: list[str]) -> None:
    steps: list[dict] = []
    breakdown: list[dict] = []
    for path in paths:
        rows = json.loads(Path(path).read_text())
        if not rows:
            continue
        if rows[0].get("benchmark") == "posttrain_memory":
            print(posttrain_memory_table(rows), end="\n\n")
        elif rows[0].get("benchmark") == "posttrain_depth":
            print(depth_table(rows), end="\n\n")
        elif "algorithm" in rows[0]:
            print(topk_table(rows), end="\n\n")
        elif "total_s" in rows[0] or "first_step_s" in rows[0] and "cache" in rows[0]:
            print(compile_table(rows), end="\n\n")
        elif "steady_ms" in rows[0]:  # posttrain_layers.py
            print(posttrain_table(rows), end="\n\n")
        elif "bytes_ratio" in rows[0]:  # sparse_forward.py
            print(sparse_forward_table(rows), end="\n\n")
        elif "form" in rows[0]:
            print(own_loop_table(rows), end="\n\n")
        elif "case" in rows[0]:
            print(eager_table(rows), end="\n\n")
        elif "async_ms_per_step" in rows[0]:  # checkpoint_async.py
            print(checkpoint_table(rows), end="\n\n")
        elif "state_bytes" in rows[0]:
            print(memory_table(rows), end="\n\n")
        elif "variant" in rows[0]:
            breakdown += rows
        elif "ratio_to_optax" in rows[0]:
            print(optax_baseline_table(rows), end="\n\n")
        elif "ratio" in rows[0]:
            steps += rows
    if breakdown:
        print(breakdown_table(breakdown), end="\n\n")
    if steps:
        print(step_table(steps))


if __name__ == "__main__":
    main(sys.argv[1:])
