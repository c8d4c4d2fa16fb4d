"""Dynamic sparse training on LeNet-300-100 / MNIST: static, SET, RigL and SNFS side by side.

Every run goes through the harness (``sparsejax.harness.training.loop.train``), so each one
leaves a ``result.json`` (under ``runs/dst_mnist/``). The script gathers them into
``experiments/results/dst_mnist.json`` and plots ``experiments/results/dst_mnist_e<epochs>.png``.
It is rerunnable: configurations whose result already exists are skipped, so a killed
sweep resumes where it stopped.

Setup (RigL's MNIST defaults): batch 100, Nesterov SGD lr 0.2 momentum 0.9, L2 1e-4,
cosine learning-rate decay, ERK layer densities for every method; a dense reference
(lr 0.1: at 0.2 the dense net diverges) runs alongside.

    .venv/bin/python experiments/dst_mnist.py --epochs 30 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sparsejax.harness.provenance import provenance  # noqa: E402
from sparsejax.harness.training.loop import TrainConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strong_common import mnist_dir, train_once  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = ROOT.parent / "runs" / "dst_mnist"

METHODS = ("static", "set", "rigl", "snfs")
SPARSITIES = (0.9, 0.95, 0.98)
# Published LeNet-300-100 / MNIST test error (%) by density, for the table beside ours.
PUBLISHED = {
    "snfs": {0.01: 2.36, 0.02: 1.99, 0.05: 1.53, 0.08: 1.45},  # Dettmers & Zettlemoyer 2019
}


# Dense LeNet-300-100 diverges at lr 0.2 (NaN within 30 steps) on this setup; the dense
# reference uses lr 0.1, the sparse methods RigL's lr 0.2.
DENSE_LR = 0.1
SPARSE_LR = 0.2


def run_name(method: str, sparsity: float | None, seed: int, epochs: int) -> str:
    s = f"_lr{DENSE_LR:g}" if sparsity is None else f"_s{sparsity:g}"
    return f"{method}{s}_e{epochs}_seed{seed}"


def config_for(method: str, sparsity: float | None, seed: int, epochs: int) -> TrainConfig:
    return TrainConfig(
        method=method, model="lenet300", dataset="mnist", data_dir=mnist_dir(),
        sparsity=sparsity, distribution=None if sparsity is None else "erk",
        epochs=epochs, batch_size=100, optimizer="nesterov",
        lr=DENSE_LR if sparsity is None else SPARSE_LR, momentum=0.9,
        weight_decay=1e-4, lr_schedule="cosine", seed=seed,
        checkpoint_every=10**9, keep_checkpoints=1, log_every=200, progress=False,
        out=str(RUNS / run_name(method, sparsity, seed, epochs)),
        # a killed run continues (or, killed before its checkpoint, starts again)
        resume=(RUNS / run_name(method, sparsity, seed, epochs)).exists(),
    )


def summarise(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["target_sparsity"], r["epochs"]), []).append(r)
    rows = []
    for (method, sparsity, epochs), rs in sorted(groups.items(), key=lambda kv: (
            -1 if kv[0][1] is None else kv[0][1], METHODS.index(kv[0][0])
            if kv[0][0] in METHODS else -1)):
        accs = [100 * r["test_accuracy"] for r in rs]
        rows.append({
            "method": method, "sparsity": sparsity, "epochs": epochs, "seeds": len(rs),
            "mean_accuracy": statistics.mean(accs),
            "std_accuracy": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "min_accuracy": min(accs), "max_accuracy": max(accs),
            "measured_sparsity": statistics.mean(r["sparsity"] for r in rs),
            "mean_wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
        })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method]
        if not pts:
            continue
        xs = [100 * r["sparsity"] for r in pts]
        ax.errorbar(xs, [r["mean_accuracy"] for r in pts],
                    yerr=[r["std_accuracy"] for r in pts], marker="o", capsize=3, label=method)
    dense = [r for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0]["mean_accuracy"], color="gray", ls="--", label="dense")
    for density, err in PUBLISHED["snfs"].items():
        if 100 * (1 - density) >= 85:
            ax.plot(100 * (1 - density), 100 - err, "k*", ms=8)
    ax.plot([], [], "k*", label="SNFS published")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    epochs = sorted({r["epochs"] for r in rows})
    ax.set_title(f"LeNet-300-100 on MNIST, {epochs[0] if epochs else ''} epochs, "
                 "mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(out_json: Path, runs: dict[str, dict], epochs: int) -> dict:
    """Write the runs, their per-cell summary and the plot of the ``epochs`` runs."""
    payload = {
        "runs": runs,
        "summary": summarise(list(runs.values())),
        "published_error_percent": {
            k: {str(d): e for d, e in v.items()} for k, v in PUBLISHED.items()},
        "provenance": provenance(),
    }
    tmp = out_json.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_json)
    plot([r for r in payload["summary"] if r["epochs"] == epochs],
         RESULTS / f"dst_mnist_e{epochs}.png")
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["dense", *METHODS])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / "dst_mnist.json"
    runs: dict[str, dict] = json.loads(out_json.read_text())["runs"] if out_json.exists() else {}

    plan = []
    for seed in args.seeds:  # seed-major: a partial sweep still covers every cell once
        for sparsity in args.sparsities:
            for method in args.methods:
                if method == "dense":
                    if sparsity == args.sparsities[0]:
                        plan.append((method, None, seed))
                else:
                    plan.append((method, sparsity, seed))
    for method, sparsity, seed in plan:
        name = run_name(method, sparsity, seed, args.epochs)
        result_file = RUNS / name / "result.json"
        if name not in runs and result_file.exists():
            result = json.loads(result_file.read_text())
        elif name in runs:
            continue
        else:
            started = time.time()
            try:
                result = train_once(config_for(method, sparsity, seed, args.epochs))
            except FloatingPointError as error:  # a diverged run is a result, not a crash
                print(f"{name}: diverged: {error}", flush=True)
                continue
            print(f"{name}: {100 * result['test_accuracy']:.2f}% "
                  f"({time.time() - started:.0f} s)", flush=True)
        runs[name] = {
            "method": method, "target_sparsity": sparsity, "seed": seed, "epochs": args.epochs,
            "test_accuracy": result["test_accuracy"], "sparsity": result["sparsity"],
            "wall_seconds": result["wall_seconds"], "steps": result["steps"],
            "config": result["config"],
        }
        # Another sweep process may have written meanwhile: merge, don't overwrite.
        if out_json.exists():
            runs = {**json.loads(out_json.read_text())["runs"], **runs}
        save(out_json, runs, args.epochs)
    payload = save(out_json, runs, args.epochs)
    for row in payload["summary"]:
        s = "dense" if row["sparsity"] is None else f"{100 * row['sparsity']:.0f}%"
        print(f"{row['method']:>7} {s:>6} e{row['epochs']}: {row['mean_accuracy']:.2f} "
              f"± {row['std_accuracy']:.2f} (n={row['seeds']})")


if __name__ == "__main__":
    main()
