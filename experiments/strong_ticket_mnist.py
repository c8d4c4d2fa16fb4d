"""Strong tickets as files: export LeNet-300-100 / MNIST runs at density 0.5 (Edge-Popup
from edge_popup_mnist.py, biprop from strong_biprop_mnist.py) as tickets (weight seed +
bit-packed masks), reload them with the weights regenerated from the seed, and measure
the test accuracy and the file size against the float32 weights and the checkpoint.

    .venv/bin/python experiments/strong_ticket_mnist.py [--run runs/strong/...]

Writes experiments/results/strong_ticket_mnist.json and .png (and the ticket files
themselves, experiments/results/strong_ticket_<run>.npz).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from strong_common import RESULTS, ROOT, RUNS, save  # noqa: E402

from sparsejax.harness.tickets import evaluate_ticket, export_ticket, load_ticket  # noqa: E402

OUTPUT = RESULTS / "strong_ticket_mnist.json"
DEFAULT_RUNS = ("edge_popup_target_d0.5_signed_constant_e14_s0",
                "strong_biprop_d0.5_kaiming_normal_e5_s0",
                "strong_biprop_d0.5_global_ramp1_e14_s0")


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, sizes = [], []
    for name, r in payload["tickets"].items():
        short = name.split("_d")[0]
        labels += [f"{short}\nticket file", f"{short}\nfloat32 weights",
                   f"{short}\ncheckpoint"]
        sizes += [r["ticket_bytes"], r["float32_params_bytes"], r["checkpoint_bytes"]]
    ax.barh(range(len(sizes)), sizes, color=["tab:green", "tab:gray", "tab:red"] * (
        len(sizes) // 3))
    for i, v in enumerate(sizes):
        ax.text(v, i, f" {v:,} B", va="center", fontsize=8)
    ax.set_yticks(range(len(sizes)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("bytes (log scale)")
    ax.set_title("LeNet-300-100 strong tickets: file size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", nargs="*", default=None, help="run folders to export")
    args = parser.parse_args()
    run_dirs = [Path(r) for r in args.run] if args.run else [RUNS / r for r in DEFAULT_RUNS]
    payload = {"tickets": {}}
    if OUTPUT.exists():
        payload = json.loads(OUTPUT.read_text())
    for run_dir in run_dirs:
        if run_dir.name in payload["tickets"]:
            continue
        if not (run_dir / "result.json").exists():
            print(f"skipping {run_dir}: not finished", flush=True)
            continue
        ticket_path = RESULTS / f"strong_ticket_{run_dir.name}.npz"
        summary = export_ticket(run_dir, ticket_path, overwrite=True)
        ticket = load_ticket(ticket_path)
        metrics = evaluate_ticket(ticket)
        trained = json.loads((run_dir / "result.json").read_text())["test_accuracy"]
        summary.update({
            "run_dir": str(run_dir.resolve().relative_to(ROOT)),
            "ticket": str(ticket_path.relative_to(ROOT)),
            "trained_run_test_accuracy": trained,
            "reloaded_ticket_test_accuracy": metrics["accuracy"],
            "identical_accuracy": metrics["accuracy"] == trained,
            "bits_per_weight": 8 * summary["ticket_bytes"] / summary["weights"],
        })
        payload["tickets"][run_dir.name] = summary
        save(OUTPUT, payload)
        print(json.dumps(summary, indent=1), flush=True)
    if payload["tickets"]:
        plot(payload, OUTPUT.with_suffix(".png"))


if __name__ == "__main__":
    main()
