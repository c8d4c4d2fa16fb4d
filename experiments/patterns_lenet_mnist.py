"""Sparsity patterns beside unstructured masks: LeNet-300-100 on real MNIST at 50% sparsity,
static, RigL and Edge-Popup each with the 2:4 pattern and unstructured (issue 20).

Every run goes through the harness (``sparsejax.harness.training.loop.train``) with the method's
recorded recipe (``TrainConfig`` fields left unset: batch size, optimizer, learning rate,
weight decay, schedule, distribution, model options) and a short, explicit number of
epochs; the only difference between the two runs of a method is ``--method-option
pattern=2:4``. Static and RigL also run unstructured with ``distribution="uniform"``
(every layer at 50%, as 2:4 puts it), since their recipes' ERK keeps fc2 and head dense
at 50%. After each run the last checkpoint is restored and its masks checked: the kept
fraction, the share of kept weights the init did not keep, and for 2:4 that every group
of every kernel holds exactly 2. Results go to ``experiments/results/patterns_lenet_mnist.json`` and
``experiments/results/patterns_lenet_mnist.png``; run folders under
``runs/patterns_lenet_mnist/``. Rerunnable: finished configurations are skipped.

    .venv/bin/python experiments/patterns_lenet_mnist.py --epochs 5 --seeds 0

"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax.core.masks import default_prunable  # noqa: E402
from sparsejax.core.patterns import as_pattern, nm_groups  # noqa: E402
from sparsejax.harness.training.loop import TrainConfig, prepare  # noqa: E402
from sparsejax.io.checkpoint import Checkpointer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strong_common import load, mnist_dir, save, train_once  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OUT_JSON = RESULTS / "patterns_lenet_mnist.json"
RUNS = ROOT.parent / "runs" / "patterns_lenet_mnist"
METHODS = ("static", "rigl", "edge_popup")
PATTERNS = ("unstructured", "unstructured_uniform", "2:4")
# The recipes of static and RigL share the density by ERK, which at 50% keeps LeNet's fc2
# and head dense and fc1 at 43%; N:M fixes every layer at N / M. "unstructured_uniform"
# (unstructured, distribution "uniform": every layer at 50%) separates the pattern's
# effect from the distribution's. Edge-Popup's recipe is uniform already.
UNIFORM_RECIPE = ("edge_popup",)
SPARSITY = 0.5


def run_name(method: str, pattern: str, seed: int, epochs: int) -> str:
    return f"{method}_{pattern.replace(':', 'of')}_s{SPARSITY:g}_e{epochs}_seed{seed}"


def config_for(method: str, pattern: str, seed: int, epochs: int) -> TrainConfig:
    out = RUNS / run_name(method, pattern, seed, epochs)
    options = {} if pattern.startswith("unstructured") else {"pattern": pattern}
    return TrainConfig(
        method=method, model="lenet300", dataset="mnist", data_dir=mnist_dir(),
        sparsity=SPARSITY, epochs=epochs, seed=seed, method_options=options,
        distribution="uniform" if pattern == "unstructured_uniform" else None,
        checkpoint_every=10**9, keep_checkpoints=1, log_every=200, progress=False,
        tensorboard=False, out=str(out), overwrite=True)


def final_mask_facts(config: TrainConfig, pattern: str) -> dict:
    """Restore the run's last checkpoint and count, over every prunable kernel, the kept
    fraction of the mask, the fraction of kept weights the init's mask did not keep, and
    (for N:M) how many groups hold exactly N and how many have more than N non-zero
    effective weights."""
    run = prepare(config)
    _, state, _ = Checkpointer(Path(config.out) / "checkpoints").restore(run.state)
    effective = run.method.effective_params(state)
    flat_masks = jax.tree_util.tree_flatten_with_path(state.masks)[0]
    flat_eff = jax.tree_util.tree_leaves(effective)
    flat_start = jax.tree_util.tree_leaves(run.state.masks)  # the init's masks
    kept = total = groups = exact = over = moved = 0
    for (path, mask), w, start in zip(flat_masks, flat_eff, flat_start, strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not default_prunable(name, mask):
            continue
        mask = np.asarray(mask)
        kept += int(mask.sum())
        moved += int(np.sum(mask & ~np.asarray(start)))
        total += mask.size
        if not pattern.startswith("unstructured"):
            parsed = as_pattern(pattern)
            per_group = np.asarray(nm_groups(mask.astype(np.int32), parsed)).sum(axis=1)
            nonzero = np.asarray(nm_groups((np.asarray(w) != 0).astype(np.int32),
                                           parsed)).sum(axis=1)
            groups += per_group.size
            exact += int(np.sum(per_group == parsed.n))
            over += int(np.sum(nonzero > parsed.n))
    # the fraction of the final kept weights that the init's mask did not keep
    facts = {"mask_density": kept / total, "kept_not_kept_at_init": moved / max(kept, 1)}
    if not pattern.startswith("unstructured"):
        facts.update(groups=groups, groups_with_exactly_n=exact,
                     groups_with_more_than_n_nonzero_effective=over)
    return facts


def summarise(runs: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs.values():
        groups.setdefault((r["method"], r["pattern"], r["epochs"]), []).append(r)
    rows = []
    for (method, pattern, epochs), rs in sorted(
            groups.items(), key=lambda kv: (METHODS.index(kv[0][0]),
                                            PATTERNS.index(kv[0][1]), kv[0][2])):
        accs = [100 * r["test_accuracy"] for r in rs]
        rows.append({
            "method": method, "pattern": pattern, "epochs": epochs, "seeds": len(rs),
            "mean_accuracy": statistics.mean(accs),
            "std_accuracy": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "measured_sparsity": statistics.mean(r["sparsity"] for r in rs),
            "mask_density": statistics.mean(r["final_masks"]["mask_density"] for r in rs
                                            if "final_masks" in r) if any(
                "final_masks" in r for r in rs) else None,
            "all_groups_exactly_n": all(
                r["final_masks"].get("groups_with_exactly_n") == r["final_masks"].get("groups")
                for r in rs if "final_masks" in r),
            "mean_wall_seconds": statistics.mean(r["wall_seconds"] for r in rs),
        })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    labels = {"unstructured": "unstructured (recipe distribution)",
              "unstructured_uniform": "unstructured, uniform 50% per layer",
              "2:4": "2:4"}
    for j, pattern in enumerate(PATTERNS):
        pts = [next((r for r in rows if r["method"] == m and r["pattern"] == pattern), None)
               for m in METHODS]
        xs = [i + (j - 1) * width for i in range(len(METHODS))]
        ys = [p["mean_accuracy"] if p else 0.0 for p in pts]
        bars = ax.bar(xs, ys, width, yerr=[p["std_accuracy"] if p else 0 for p in pts],
                      label=labels[pattern], capsize=3)
        for bar, y in zip(bars, ys, strict=True):
            if y:
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(METHODS)), METHODS)
    finite = [r["mean_accuracy"] for r in rows]
    if finite:
        ax.set_ylim(min(finite) - 1.0, max(finite) + 0.6)
    ax.set_ylabel("test accuracy (%)")
    epochs = sorted({r["epochs"] for r in rows})
    seeds = sorted({r["seeds"] for r in rows})
    ax.set_title(f"LeNet-300-100 / MNIST, 50% sparse, {'/'.join(map(str, epochs))} epochs, "
                 f"mean ± std of {'/'.join(map(str, seeds))} seeds", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    args = parser.parse_args()
    payload = load(OUT_JSON)
    runs = payload.get("runs", {})
    for name, record in runs.items():  # runs recorded before the mask check existed
        if "final_masks" not in record:
            config = config_for(record["method"], record["pattern"], record["seed"],
                                record["epochs"])
            record["final_masks"] = final_mask_facts(config, record["pattern"])
            print(f"{name}: final masks {record['final_masks']}", flush=True)
    if runs:
        rows = summarise(runs)
        save(OUT_JSON, {"runs": runs, "summary": rows,
                        "sparsity": SPARSITY})
        plot(rows, RESULTS / "patterns_lenet_mnist.png")
    for seed in args.seeds:
        for method in args.methods:
            for pattern in args.patterns:
                name = run_name(method, pattern, seed, args.epochs)
                if name in runs or (pattern == "unstructured_uniform"
                                    and method in UNIFORM_RECIPE):
                    continue
                started = time.time()
                result = train_once(config_for(method, pattern, seed, args.epochs))
                runs[name] = {
                    "method": method, "pattern": pattern, "seed": seed,
                    "epochs": args.epochs, "target_sparsity": SPARSITY,
                    "test_accuracy": result["test_accuracy"],
                    "test_loss": result["test_loss"], "sparsity": result["sparsity"],
                    "steps": result["steps"], "wall_seconds": time.time() - started,
                    "config": result["config"], "config_sources": result["config_sources"],
                }
                runs[name]["final_masks"] = final_mask_facts(
                    config_for(method, pattern, seed, args.epochs), pattern)
                print(f"{name}: {100 * result['test_accuracy']:.2f}% "
                      f"(sparsity {result['sparsity']:.4f}, {time.time() - started:.0f} s)",
                      flush=True)
                rows = summarise(runs)
                save(OUT_JSON, {"runs": runs, "summary": rows,
                                "sparsity": SPARSITY})
                plot(rows, RESULTS / "patterns_lenet_mnist.png")


if __name__ == "__main__":
    main()
