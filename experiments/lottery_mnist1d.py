"""Lottery tickets on MNIST-1D (Greydanus 2020, "Scaling down deep learning"): IMP with
rewinding to init on the MLP 40-500-500-10, against the random-mask (random pruning) and
random re-initialisation controls. The paper reports 74.3% test accuracy for the tickets at
90% sparsity against 64.6% for random masks.

Setup, after the paper's notebook (``notebooks/5. lottery_tickets.ipynb`` of
greydanus/mnist1d): Adam at a constant 2e-2, batch 100, 1,500 steps per round (the
notebook's 1,501), layer-wise magnitude pruning with every layer, the output layer too,
pruned at the same rate, survivors rewound to their initial values. The notebook prunes
in 100 rounds (sparsity 0, 1%, 2%, ... of the original weights); here 10 rounds that each
remove 20.57% of the survivors reach 90% sparsity exactly (10.0% of the weights remain).
Every round trains the ticket and both controls. Other differences: biases are not pruned
(the notebook masks them too), kernels are Glorot-normal (PyTorch's default uniform init
there), the notebook's second hidden layer is residual (``h + relu(W h)``), the data order
is shuffled per epoch, and each seed generates its own MNIST-1D draw (``load_dataset``).

    python experiments/lottery_mnist1d.py run                # seeds 0 1 2, then the report
    python experiments/lottery_mnist1d.py report             # JSON + PNG from the runs

Seed ``s`` is the CLI run (no data folder needed)

    sparsejax lottery --dataset mnist1d --model mlp --steps 1500 --batch-size 100 --lr 0.02 \\
        --prune-fraction 0.2057 --output-fraction same --rounds 10 \\
        --controls reinit,random_mask --seed s --out runs/lottery_mnist1d/seed_s

Each seed's run lives in runs/lottery_mnist1d/seed_<s>/; the driver caches every round
and resumes a killed run, and a seed whose rounds are all done is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from sparsejax.harness.lottery import LotteryConfig, run_lottery
from sparsejax.harness.provenance import provenance

RESULTS = Path(__file__).parent / "results"
RUNS = Path("runs/lottery_mnist1d")
STEPS = 1500
ROUNDS = 10
PRUNE_FRACTION = 0.2057  # 10 rounds: (1 - 0.2057)^10 = 10.0% remaining, 90% sparsity
KINDS = ("ticket", "random_mask", "reinit")
LABELS = {"ticket": "winning ticket (IMP, rewind to init)",
          "random_mask": "random mask (random pruning), init weights",
          "reinit": "ticket's mask, random re-init"}
PUBLISHED = {"sparsity": 0.9, "ticket": 0.743, "random_mask": 0.646}


def config(seed: int) -> LotteryConfig:
    return LotteryConfig(model="mlp", dataset="mnist1d", steps=STEPS, batch_size=100,
                         optimizer="adam", lr=2e-2, lr_schedule="constant",
                         prune_fraction=PRUNE_FRACTION, output_fraction=None,
                         distribution="uniform", rewind="0it", rounds=ROUNDS,
                         controls=("reinit", "random_mask"), seed=seed,
                         out=str(RUNS / f"seed_{seed}"))


def command(seed: int) -> str:
    return ("sparsejax lottery --dataset mnist1d --model mlp --steps 1500 --batch-size 100 "
            f"--lr 0.02 --prune-fraction {PRUNE_FRACTION} --output-fraction same --rounds "
            f"{ROUNDS} --controls reinit,random_mask --seed {seed} --out {RUNS}/seed_{seed}")


def finished(seed: int) -> bool:
    root = RUNS / f"seed_{seed}"
    return all((root / f"round_{r:02d}" / kind / "result.json").exists()
               for r in range(ROUNDS + 1) for kind in (KINDS if r else ("ticket",)))


def run(seed: int) -> None:
    if finished(seed):
        print(f"seed {seed}: done, skipped", file=sys.stderr)
        return
    started = time.time()
    run_lottery(config(seed))
    timing = RUNS / f"seed_{seed}" / "wall_seconds.json"
    timing.write_text(json.dumps({"wall_seconds": time.time() - started}) + "\n")


def read_seed(seed: int) -> list[dict[str, float]]:
    """Per round: density, and final and best (over the per-epoch curve) test accuracy of
    each branch that has finished."""
    root = RUNS / f"seed_{seed}"
    rows = []
    for r in range(ROUNDS + 1):
        row: dict[str, float] = {"round": r}
        for kind in KINDS:
            path = root / f"round_{r:02d}" / kind / "result.json"
            if not path.exists():
                continue
            res = json.loads(path.read_text())
            row[kind] = res["test_accuracy"]
            row[f"{kind}_best"] = max(acc for _, acc in res["curve"])
            row[f"{kind}_seconds"] = res["seconds"]
            if kind == "ticket":
                row["density"] = res["density"]
                row["sparsity"] = res["sparsity"]
        if "ticket" in row:
            rows.append(row)
    return rows


def report(seeds: list[int]) -> dict[str, object]:
    per_seed = {s: read_seed(s) for s in seeds}
    per_seed = {s: rows for s, rows in per_seed.items() if rows}
    if not per_seed:
        raise SystemExit(f"no finished rounds under {RUNS}; run first")
    done = sorted(per_seed)
    table = []
    for r in range(ROUNDS + 1):
        rows = [per_seed[s][r] for s in done if len(per_seed[s]) > r]
        if not rows:
            continue
        entry: dict[str, object] = {"round": r,
                                    "density": float(np.mean([x["density"] for x in rows])),
                                    "sparsity": float(np.mean([x["sparsity"] for x in rows]))}
        for kind in KINDS:
            for key in (kind, f"{kind}_best"):
                values = [x[key] for x in rows if key in x]
                if values:
                    entry[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                                  "max": float(np.max(values)), "values": values}
        table.append(entry)
    at_90 = min(table, key=lambda e: abs(e["sparsity"] - 0.9))
    wall = {}
    for s in done:
        path = RUNS / f"seed_{s}" / "wall_seconds.json"
        branches = sum(x.get(f"{k}_seconds", 0.0) for x in per_seed[s] for k in KINDS)
        wall[s] = {"train_seconds": branches,
                   "wall_seconds": json.loads(path.read_text())["wall_seconds"]
                   if path.exists() else None}
    payload = {
        "experiment": "IMP with rewinding to init, MLP 40-500-500-10, MNIST-1D, "
                      "against random-mask and random-reinit controls",
        "setup": {"model": "mlp (hidden 500, 500)", "optimizer": "adam", "lr": 2e-2,
                  "lr_schedule": "constant", "batch_size": 100, "steps_per_round": STEPS,
                  "rounds": ROUNDS, "prune_fraction": PRUNE_FRACTION,
                  "output_fraction": "same as the other layers", "distribution": "layer-wise",
                  "rewind": "init", "pruned": "kernels (biases dense)",
                  "accuracy": "test accuracy at the end of each round's training; *_best: "
                              "the best of the per-epoch evaluations"},
        "commands": [command(s) for s in done],
        "seeds": done,
        "per_seed": {str(s): per_seed[s] for s in done},
        "rounds": table,
        "at_90_sparsity": at_90,
        "timing": {str(s): wall[s] for s in done},
        "published": {"source": "Greydanus 2020, Scaling down deep learning (MNIST-1D)",
                      **PUBLISHED},
        "provenance": provenance(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lottery_mnist1d.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(table, done)
    for entry in table:
        print(f"round {entry['round']:2d} sparsity {100 * entry['sparsity']:5.1f}%  " + "  ".join(
            f"{k} {100 * entry[k]['mean']:.1f} [{100 * entry[k]['min']:.1f}, "
            f"{100 * entry[k]['max']:.1f}]" for k in KINDS if k in entry))
    return payload


def plot(table: list[dict[str, object]], seeds: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"ticket": "tab:blue", "random_mask": "tab:green", "reinit": "tab:orange"}
    for kind in KINDS:
        pts = [(100 * e["sparsity"], e[kind]) for e in table if kind in e]
        if kind != "ticket":  # the controls branch off at round >= 1
            pts = [(x, v) for x, v in pts if x > 0]
        if not pts:
            continue
        x = np.array([p[0] for p in pts])
        mean = np.array([100 * p[1]["mean"] for p in pts])
        low = np.array([100 * p[1]["min"] for p in pts])
        high = np.array([100 * p[1]["max"] for p in pts])
        ax.plot(x, mean, marker="o", color=colors[kind], label=LABELS[kind])
        ax.fill_between(x, low, high, color=colors[kind], alpha=0.2)
    ax.plot([90], [100 * PUBLISHED["ticket"]], marker="*", ms=14, ls="none", color="tab:blue",
            markeredgecolor="k", label="paper: ticket at 90% (74.3%)")
    ax.plot([90], [100 * PUBLISHED["random_mask"]], marker="*", ms=14, ls="none",
            color="tab:green", markeredgecolor="k", label="paper: random mask at 90% (64.6%)")
    ax.set_xlabel("sparsity (% of kernel weights pruned)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"MLP 40-500-500-10 on MNIST-1D, IMP ({STEPS} steps/round), "
                 f"mean and min-max over seeds {seeds}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "lottery_mnist1d.png", dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args = parser.parse_args()
    if args.what == "run":
        for seed in args.seeds:
            run(seed)
    report(args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
