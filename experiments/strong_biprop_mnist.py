"""Binarized multi-prize tickets (biprop) on LeNet-300-100 / real MNIST, beside Edge-Popup
at the same density and training length.

    .venv/bin/python experiments/strong_biprop_mnist.py [--epochs 5]

Writes experiments/results/strong_biprop_mnist.json and .png; rerunnable. The Edge-Popup
comparison points are copied from experiments/results/edge_popup_mnist.json (the runs
with the same density and epochs; rerun this script after that one to fill them in).
Effective weights of biprop: sign(w) * alpha * mask, one alpha per layer; all three
layers binarized and masked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from strong_common import RESULTS, load, run, save  # noqa: E402

OUTPUT = RESULTS / "strong_biprop_mnist.json"
EDGE_POPUP = RESULTS / "edge_popup_mnist.json"


def configs(epochs: int, seed: int) -> list[tuple[str, float, dict]]:
    jobs = [(f"biprop_d{density}_kaiming_normal_e{epochs}_s{seed}", density,
             {"weight_init": "kaiming_normal"}) for density in (0.5, 0.2)]
    jobs.append((f"biprop_d0.5_global_ramp1_e{epochs}_s{seed}", 0.5,
                 {"weight_init": "kaiming_normal", "scope": "global", "ramp_epochs": 1}))
    return jobs


def edge_popup_points(epochs: int, seed: int) -> dict:
    """The Edge-Popup runs of edge_popup_mnist.py at the biprop densities (if done)."""
    if not EDGE_POPUP.exists():
        return {}
    runs = json.loads(EDGE_POPUP.read_text())["runs"]
    return {f"edge_popup_{k}": r for k, r in runs.items()
            if k.startswith(("curve_", "target_")) and r["density"] in (0.2, 0.5)
            and r["epochs"] == epochs and r["seed"] == seed}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    names = sorted(runs, key=lambda k: (runs[k]["epochs"], runs[k]["density"],
                                        runs[k]["method"], k))
    labels = [f"{runs[k]['method']}\nd={runs[k]['density']}, {runs[k]['epochs']} ep\n"
              f"{runs[k]['method_options'].get('weight_init', '')[:7]}"
              f"{' global' if runs[k]['method_options'].get('scope') == 'global' else ''}"
              for k in names]
    values = [100 * runs[k]["test_accuracy"] for k in names]
    colors = ["tab:orange" if runs[k]["method"] == "biprop" else "tab:blue" for k in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    ax.bar(range(len(names)), values, color=colors)
    for i, v in enumerate(values):
        ax.text(i, v + 0.1, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), labels, fontsize=7)
    ax.set_ylim(min(values) - 2, 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Binarized tickets (orange) vs Edge-Popup (blue), LeNet-300-100, MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    payload = load(OUTPUT)
    payload["setup"] = ("LeNet-300-100 without biases, real MNIST, batch 64, SGD momentum "
                        "0.9, lr 0.1 cosine, weight decay 5e-4 on the scores; one seed")
    for name, density, options in configs(args.epochs, args.seed):
        if name not in payload["runs"]:
            payload["runs"][name] = run(f"strong_{name}", "biprop", density, args.epochs,
                                        seed=args.seed, method_options=options)
            save(OUTPUT, payload)
            plot(payload, OUTPUT.with_suffix(".png"))
    payload["runs"].update(edge_popup_points(args.epochs, args.seed))
    save(OUTPUT, payload)
    plot(payload, OUTPUT.with_suffix(".png"))
    for name, r in sorted(payload["runs"].items()):
        print(f"{name:50s} {100 * r['test_accuracy']:6.2f}%  sparsity "
              f"{r['measured_sparsity']:.4f}")


if __name__ == "__main__":
    main()
