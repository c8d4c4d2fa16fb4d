"""Pruning at initialisation on LeNet-300-100 / real MNIST: SNIP, GraSP, SynFlow (and
random and magnitude pruning as references) at 95% and 98% sparsity, global selection.

The masks come from the harness exactly as ``sparsejax train --method M --sparsity S``
builds them (``sparsejax.harness.training.prepare``: the registered method scores w_0 on the run's
first training batches); the survivors are then trained under the fixed mask with the
compiled trainer of ``sparsejax.harness.lottery`` (the same ``fixed_mask`` engine, the whole
epoch in one ``lax.scan``), which is several times faster on this machine.

    python experiments/pruning_at_init_mnist.py     # skips configurations already done
    python experiments/pruning_at_init_mnist.py --setups sgd100wd   # only these recipes

Writes experiments/results/pruning_at_init_mnist.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from sparsejax.core.masks import sparsity_report
from sparsejax.core.transforms import zero_masked
from sparsejax.harness.lottery import LotteryConfig, Trainer
from sparsejax.harness.provenance import provenance
from sparsejax.harness.training.loop import TrainConfig, prepare

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strong_common import mnist_dir  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "pruning_at_init_mnist.json"
METHODS = ("snip", "grasp", "synflow", "random_prune", "magnitude")
SPARSITIES = (0.95, 0.98)
SEEDS = (0,)  # per recipe unless it names its own "seeds"
BATCH = 100
# Training recipes for the survivors: a short Adam run for every method, and SGD runs in
# the SNIP paper's optimizer setting (SGD momentum 0.9, lr 0.1, batch 100; the paper
# trains 250k steps with step decay). sgd60 (60 epochs = 36k steps, cosine) has no weight
# decay; the SNIP reference code (snip-public, model.py) adds 0.00025 * sum(w^2) to the
# loss, i.e. L2 weight decay 5e-4 on the gradient, which the wd recipes add: sgd100wd
# (100 epochs = 60k steps) for SNIP, GraSP and SynFlow, sgd400wd (400 epochs = 240k
# steps, about the paper's 250k) for SNIP on three seeds.
SGD_WD = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4}
SETUPS = {
    "adam20": {"optimizer": "adam", "lr": 1e-3, "epochs": 20, "methods": METHODS},
    "sgd60": {"optimizer": "sgd", "lr": 0.1, "epochs": 60,
              "methods": ("snip", "synflow", "grasp")},
    "sgd100wd": {**SGD_WD, "epochs": 100, "methods": ("snip", "synflow", "grasp"),
                 "eval_every": 25},
    "sgd400wd": {**SGD_WD, "epochs": 400, "methods": ("snip",), "seeds": (0, 1, 2),
                 "eval_every": 50},
}
INIT_BATCHES = {"snip": 1, "grasp": 3}  # GraSP: 10 examples per class need ~300 examples
PUBLISHED = {("snip", 0.95): 98.4, ("snip", 0.98): 97.6}


def run_one(method: str, sparsity: float, seed: int, trainer: Trainer, setup: str) -> dict:
    recipe = SETUPS[setup]
    config = TrainConfig(method=method, model="lenet300", dataset="mnist",
                         data_dir=mnist_dir(), sparsity=sparsity,
                         epochs=recipe["epochs"], batch_size=BATCH,
                         optimizer=recipe["optimizer"], lr=recipe["lr"],
                         weight_decay=recipe.get("weight_decay", 0.0),
                         lr_schedule="cosine", seed=seed,
                         init_batches=INIT_BATCHES.get(method, 1))
    started = time.time()
    masks = jax.device_get(prepare(config).state.masks)
    init = trainer.initial_state()
    start = init.replace(params=zero_masked(init.params, masks), masks=masks)
    every = recipe.get("eval_every", 0) * trainer.batches_per_epoch
    curve: list[tuple[int, float]] = []

    def record(state) -> None:  # test accuracy along the way, for reading only
        if every and int(state.step) % every == 0:
            curve.append((int(state.step) // trainer.batches_per_epoch, trainer.accuracy(state)))

    state = trainer.train(start, trainer.total_steps, on_boundary=record)
    rows = sparsity_report(jax.device_get(trainer.method.effective_params(state)))
    result = {"method": method, "target_sparsity": sparsity, "seed": seed, "setup": setup,
              "sparsity": rows[-1].sparsity, "test_accuracy": trainer.accuracy(state),
              "layer_density": {r.path: r.density for r in rows[:-1] if r.prunable},
              "seconds": time.time() - started}
    if curve:
        result["test_accuracy_by_epoch"] = curve
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS),
                        help="run only these recipes (default: all)")
    args = parser.parse_args(argv)
    results = json.loads(OUT.read_text())["runs"] if OUT.exists() else []
    for r in results:
        r.setdefault("setup", "adam20")
    done = {(r["setup"], r["method"], r["target_sparsity"], r["seed"]) for r in results}
    for setup, recipe in SETUPS.items():
        if setup not in args.setups:
            continue
        trainers: dict[int, Trainer] = {}
        for seed in recipe.get("seeds", SEEDS):
            for sparsity in SPARSITIES:
                for method in recipe["methods"]:
                    if (setup, method, sparsity, seed) in done:
                        continue
                    if seed not in trainers:
                        trainers[seed] = Trainer(LotteryConfig(
                            dataset="mnist", data_dir=mnist_dir(),
                            epochs=recipe["epochs"], batch_size=BATCH,
                            optimizer=recipe["optimizer"], lr=recipe["lr"],
                            weight_decay=recipe.get("weight_decay", 0.0),
                            lr_schedule="cosine", seed=seed))
                    res = run_one(method, sparsity, seed, trainers[seed], setup)
                    print(json.dumps(res), flush=True)
                    results.append(res)
                    write(results)
    write(results)
    return 0


def write(results: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = []
    for setup in SETUPS:
        for method in METHODS:
            for sparsity in SPARSITIES:
                accs = [r["test_accuracy"] for r in results if r.get("setup") == setup
                        and r["method"] == method and r["target_sparsity"] == sparsity]
                if accs:
                    summary.append({"setup": setup, "method": method, "sparsity": sparsity,
                                    "mean_accuracy": float(np.mean(accs)),
                                    "std_accuracy": float(np.std(accs, ddof=1))
                                    if len(accs) > 1 else None,
                                    "seeds": len(accs),
                                    "published": PUBLISHED.get((method, sparsity))})
    payload = {"experiment": "pruning at init, LeNet-300-100, MNIST, global selection",
               "setup": {"recipes": {k: {**v, "methods": list(v["methods"]),
                                         **({"seeds": list(v["seeds"])} if "seeds" in v else {})}
                                     for k, v in SETUPS.items()},
                         "lr_schedule": "cosine", "batch_size": BATCH,
                         "init_batches": INIT_BATCHES,
                         "grasp": "T=200, 10 examples per class",
                         "synflow": "100 iterations, exponential schedule, data-free"},
               "runs": results, "summary": summary, "provenance": provenance()}
    OUT.write_text(json.dumps(payload, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(14, 4))
    groups = [(setup, m) for setup, recipe in SETUPS.items() for m in recipe["methods"]]
    labels = [m if setup == "adam20" else f"{m}\n({setup})" for setup, m in groups]
    width = 0.8 / len(SPARSITIES)
    for j, sparsity in enumerate(SPARSITIES):
        cells = [next((s for s in summary if s["setup"] == setup and s["method"] == m
                       and s["sparsity"] == sparsity), None) for setup, m in groups]
        vals = [c["mean_accuracy"] * 100 if c else np.nan for c in cells]
        errs = [(c["std_accuracy"] or 0.0) * 100 if c else 0.0 for c in cells]
        ax.bar(np.arange(len(labels)) + j * width, vals, width, yerr=errs, capsize=2,
               label=f"{sparsity:.0%} sparse")
    for (m, sp), pub in PUBLISHED.items():
        for x0 in (i for i, (_, gm) in enumerate(groups) if gm == m):
            x = x0 + SPARSITIES.index(sp) * width
            ax.plot([x - width / 2, x + width / 2], [pub, pub], "k-", lw=2)
    ax.set_xticks(np.arange(len(labels)) + width * (len(SPARSITIES) - 1) / 2, labels,
                  fontsize=8)
    ax.set_ylim(90, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Pruning at init, LeNet-300-100 MNIST (black: SNIP published)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "pruning_at_init_mnist.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
