"""Instability analysis (linear mode connectivity, Frankle et al. 2020) on LeNet-300-100 /
real MNIST: two copies trained from the same rewind point w_k with different data orders
(SGD noise), test error along (1 - a) w_A + a w_B, and the error barrier (the largest
error on the path above the mean of its ends).

Networks: the dense network rewound to k = 0, 100 and 1000 steps (1 epoch), and the
IMP ticket of lottery_mnist.py seed 0 at round 15 (3.6% of weights) rewound to k = 0.
Same recipe as lottery_mnist.py (Adam 1.2e-3, batch 60, cosine over 5 epochs).

    python experiments/instability_mnist.py      # skips what is done (cached in runs/)

Writes experiments/results/instability_mnist.json and .png.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from sparsejax.harness.lottery import LotteryConfig, config_hash, instability
from sparsejax.harness.provenance import provenance

sys.path.insert(0, str(Path(__file__).parent))
from lottery_mnist import config as lottery_config  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = (("dense", 0, "0it"), ("dense", 0, "1ep"), ("ticket_3.6pct", 15, "0it"),
         ("dense", 0, "100it"))


def case_config(rewind: str) -> LotteryConfig:
    return dataclasses.replace(lottery_config(0), rewind=rewind)


def main() -> int:
    results = []
    for name, round_index, rewind in CASES:
        config = case_config(rewind)
        if round_index:
            done = Path(config.out_root) / config_hash(config) / f"round_{round_index:02d}" \
                / "ticket" / "result.json"
            if not done.exists():
                print(f"skipping {name}: round {round_index} of the lottery run is not done",
                      file=sys.stderr)
                continue
        res = instability(config, round_index)
        res = {k: v for k, v in res.items() if k != "config"}
        res["name"] = name
        res["rewind"] = rewind
        print(json.dumps(res), flush=True)
        results.append(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": "instability analysis, LeNet-300-100, MNIST",
               "setup": {"optimizer": "adam", "lr": 1.2e-3, "lr_schedule": "cosine",
                         "batch_size": 60, "epochs": 5, "data_seeds": [101, 102]},
               "runs": results, "provenance": provenance()}
    (RESULTS / "instability_mnist.json").write_text(json.dumps(payload, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results:
        label = (f"{res['name']} ({100 * res['density']:.1f}% weights), k={res['rewind_step']}: "
                 f"barrier {100 * res['barrier']:.2f} pp")
        ax.plot(res["alphas"], [100 * e for e in res["errors"]], marker="o", label=label)
    ax.set_xlabel("interpolation a: (1 - a) w_A + a w_B")
    ax.set_ylabel("test error (%)")
    ax.set_title("Linear mode connectivity from the rewind point, LeNet-300-100 MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "instability_mnist.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
