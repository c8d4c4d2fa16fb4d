"""Edge-Popup on LeNet-300-100 / real MNIST (Ramanujan et al. 2020, the paper's MNIST
example): the accuracy at density 0.5, and accuracy versus density for Kaiming-normal
against signed-Kaiming-constant frozen weights.

    .venv/bin/python experiments/edge_popup_mnist.py [--part target|curve|all]
        [--target-epochs 14] [--curve-epochs 5] [--densities ...] [--inits ...]

Writes experiments/results/edge_popup_mnist.json and .png; rerunnable (finished
configurations are skipped). Accuracy is measured on the hard mask over the frozen
weights (``effective_params``), on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from strong_common import RESULTS, load, run, save  # noqa: E402

OUTPUT = RESULTS / "edge_popup_mnist.json"
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
INITS = ("kaiming_normal", "signed_constant")


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    runs = payload["runs"]
    inits = sorted({r["method_options"]["weight_init"] for k, r in runs.items()
                    if k.startswith("curve_")}, key=lambda i: (i not in INITS, i))
    for init, marker in zip(inits, "os^v", strict=False):
        points = sorted((r["density"], 100 * r["test_accuracy"]) for k, r in runs.items()
                        if k.startswith("curve_") and r["method_options"]["weight_init"] == init)
        if points:
            xs, ys = zip(*points, strict=True)
            left.plot(xs, ys, marker=marker, label=init.replace("_", " "))
    left.set_xscale("log")
    left.set_xlabel("density (fraction of weights kept)")
    left.set_ylabel("test accuracy (%)")
    epochs = {r["epochs"] for k, r in runs.items() if k.startswith("curve_")}
    left.set_title(f"Edge-Popup, LeNet-300-100, MNIST ({', '.join(map(str, epochs))} epochs)")
    left.grid(True, alpha=0.3)
    left.legend()
    for key, r in sorted(runs.items()):
        if key.startswith("target_"):
            curve = [100 * a for a in r["test_accuracy_per_epoch"]]
            right.plot(range(1, len(curve) + 1), curve, marker=".",
                       label=f"density {r['density']}, {r['method_options']['weight_init']}")
    right.axhline(97.8, color="gray", linestyle="--", label="target 97.8%")
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy (%)")
    right.set_title("Edge-Popup at density 0.5 (paper's MNIST setup)")
    right.grid(True, alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("target", "curve", "all"), default="all")
    parser.add_argument("--target-epochs", type=int, default=14)
    parser.add_argument("--curve-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--densities", type=float, nargs="+", default=DENSITIES)
    parser.add_argument("--inits", nargs="+", default=INITS,
                        help="weight inits of the curve (see sparsejax.methods.strong)")
    args = parser.parse_args()
    payload = load(OUTPUT)
    payload["setup"] = ("LeNet-300-100 without biases, real MNIST, batch 64, SGD momentum "
                        "0.9, lr 0.1 cosine, weight decay 5e-4 on the scores, per-layer "
                        "top-k, all three layers masked; one seed")
    jobs = []
    if args.part in ("target", "all"):
        jobs.append((f"target_d0.5_signed_constant_e{args.target_epochs}_s{args.seed}", 0.5,
                     "signed_constant", args.target_epochs))
    if args.part in ("curve", "all"):
        for density in args.densities:
            for init in args.inits:
                jobs.append((f"curve_d{density}_{init}_e{args.curve_epochs}_s{args.seed}",
                             density, init, args.curve_epochs))
    for name, density, init, epochs in jobs:
        if name not in payload["runs"]:
            payload["runs"][name] = run(f"edge_popup_{name}", "edge_popup", density, epochs,
                                        seed=args.seed,
                                        method_options={"weight_init": init})
            save(OUTPUT, payload)
            plot(payload, OUTPUT.with_suffix(".png"))
    save(OUTPUT, payload)
    plot(payload, OUTPUT.with_suffix(".png"))
    for name, r in sorted(payload["runs"].items()):
        print(f"{name:50s} {100 * r['test_accuracy']:6.2f}%  sparsity "
              f"{r['measured_sparsity']:.4f}  {r['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
