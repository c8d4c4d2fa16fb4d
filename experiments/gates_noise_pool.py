"""Does the gates' noise pool (``noise='pool'``: one window of draws made at init, read at
a random offset each step) keep the accuracy of fresh noise? (issue #22, speed rows)

The gates' recipe (``sparsejax train --method gates --sparsity S``, LeNet-300-100 on real
MNIST, 40 epochs) with fresh noise and with the pool, same seeds, everything else equal;
one ``sparsejax.harness.training.loop.train`` run each in ``runs/gates_noise_pool/<name>``.
Results go to experiments/results/gates_noise_pool.json (finished runs are skipped, so
the script resumes) and a bar plot beside it.

    python experiments/gates_noise_pool.py --sparsity 0.9 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strong_common import RESULTS, ROOT, load, mnist_dir, save, train_once  # noqa: E402

from sparsejax.harness.plotting import pyplot, save_figure  # noqa: E402
from sparsejax.harness.training.loop import TrainConfig  # noqa: E402

OUTPUT = RESULTS / "gates_noise_pool.json"
RUNS = ROOT / "runs" / "gates_noise_pool"
NOISES = ("fresh", "pool")


def run(noise: str, sparsity: float, seed: int, epochs: int,
        options: dict[str, Any]) -> dict[str, Any]:
    name = f"{noise}_s{sparsity}_e{epochs}_seed{seed}"
    out = RUNS / name
    config = TrainConfig(
        method="gates", model="lenet300", dataset="mnist", data_dir=mnist_dir(),
        sparsity=sparsity, epochs=epochs, seed=seed, out=str(out), progress=False,
        tensorboard=False, keep_checkpoints=1, log_every=500,
        method_options={"noise": noise, **options})
    config.resume = out.exists()
    result = train_once(config)
    print(f"{name}: {100 * result['test_accuracy']:.2f}% at {100 * result['sparsity']:.2f}% "
          f"({result['wall_seconds']:.0f} s)", flush=True)
    return {"noise": noise, "target_sparsity": sparsity, "seed": seed, "epochs": epochs,
            "method_options": result["config"]["method_options"],
            "test_accuracy": result["test_accuracy"], "measured_sparsity": result["sparsity"],
            "wall_seconds": result["wall_seconds"]}


def summarise(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for r in runs.values():
        groups.setdefault((r["noise"], r["target_sparsity"], r["epochs"]), []).append(r)
    rows = []
    for (noise, sparsity, epochs), rs in sorted(groups.items()):
        accs = [100 * r["test_accuracy"] for r in sorted(rs, key=lambda r: r["seed"])]
        rows.append({"noise": noise, "target_sparsity": sparsity, "epochs": epochs,
                     "seeds": [r["seed"] for r in sorted(rs, key=lambda r: r["seed"])],
                     "test_accuracy_percent": accs,
                     "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "measured_sparsity_percent": [100 * r["measured_sparsity"] for r in rs]})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"{r['noise']}\n{100 * r['target_sparsity']:.0f}%" for r in rows]
    ax.bar(labels, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4)
    ax.set_ylim(min(r["mean"] for r in rows) - 1, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("gates: fresh noise vs noise pool (LeNet-300-100, MNIST)")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--binarize", default=None,
                        help="binarize rule for both (default: the method's)")
    args = parser.parse_args()
    options = {} if args.binarize is None else {"binarize": args.binarize}
    payload = load(OUTPUT)
    for seed in args.seeds:
        for noise in NOISES:
            key = f"{noise}_s{args.sparsity}_e{args.epochs}_seed{seed}"
            if key not in payload["runs"]:
                payload["runs"][key] = run(noise, args.sparsity, seed, args.epochs, options)
                payload["summary"] = summarise(payload["runs"])
                save(OUTPUT, payload)
    plot(payload["summary"], OUTPUT.with_suffix(".png"))


if __name__ == "__main__":
    main()
