"""Training time per step of static, SET, RigL and SNFS against the dense step, measured
in the same process on LeNet-300-100 / MNIST batches of 100.

Every method's train step is the training loop's (``SingleDeviceTrainer``: the state
donated, and for SET, RigL and SNFS a separately compiled step for the steps that move the
mask). Each is warmed up (compilation and one mask update), then
the methods are timed in interleaved rounds of ``--window`` steps each (default 600 =
one epoch), so that the mask updates are amortised at their training frequency (RigL
every 100 steps, SET and SNFS once per epoch) and machine noise hits all methods alike.
The per-step time of a round is divided by the dense step of the same round; the median
over rounds is reported. A second measurement times a step on which the mask moves
(``update_every=1``) to show the cost of one update on its own.

Writes ``experiments/results/dst_timing.json`` and ``dst_timing.png``.

    .venv/bin/python experiments/dst_timing.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax.engine.parallel import SingleDeviceTrainer  # noqa: E402
from sparsejax.harness.data import load_dataset  # noqa: E402
from sparsejax.harness.models import get_model, init_model  # noqa: E402
from sparsejax.harness.provenance import provenance  # noqa: E402
from sparsejax.harness.training.loop import classification_loss  # noqa: E402
from sparsejax.harness.training.optim import make_optimizer  # noqa: E402
from sparsejax.methods import get_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strong_common import mnist_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BIG = 10**7  # a run length that never ends the update schedule during timing


def methods(optimizer, sparsity: float, epoch: int, every: int | None = None) -> dict:
    def opts(default: int) -> dict:
        return {"update_every": every or default}

    return {
        "dense": get_method("dense", optimizer),
        "static": get_method("static", optimizer, sparsity=sparsity),
        "set": get_method("set", optimizer, sparsity=sparsity, total_steps=BIG, **opts(epoch)),
        "rigl": get_method("rigl", optimizer, sparsity=sparsity, total_steps=BIG,
                           end_step=BIG, **opts(100)),
        "snfs": get_method("snfs", optimizer, sparsity=sparsity, total_steps=BIG,
                           **opts(epoch)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--window", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--update-steps", type=int, default=50,
                        help="steps timed with a mask update on every step")
    args = parser.parse_args()

    dataset = load_dataset("mnist", mnist_dir())
    model = get_model("lenet300", dataset.num_classes)
    params, model_state = init_model(model, jax.random.PRNGKey(0), (1, *dataset.input_shape))
    optimizer = make_optimizer("nesterov", 0.2, total_steps=BIG, weight_decay=1e-4)
    loss_fn = classification_loss(model)
    batches = [{"image": dataset.train_images[i * 100:(i + 1) * 100],
                "label": dataset.train_labels[i * 100:(i + 1) * 100]} for i in range(8)]
    batches = [jax.device_put(b) for b in batches]

    def prepare(table: dict) -> dict:
        out = {}
        for name, method in table.items():
            step = SingleDeviceTrainer(method, loss_fn).step  # what the loop runs
            # a copy: the trainer donates the state, and dense init keeps these arrays
            state = method.init(jax.tree_util.tree_map(np.array, params),
                                jax.random.PRNGKey(1), model_state)
            out[name] = [step, state]
        return out

    def advance(entry: list, n: int) -> float:
        step, state = entry
        started = time.perf_counter()
        for i in range(n):
            state, _ = step(state, batches[i % len(batches)])
        jax.block_until_ready(state.params)
        entry[1] = state
        return (time.perf_counter() - started) / n

    # Amortised: updates at their training frequency.
    table = prepare(methods(optimizer, args.sparsity, args.window))
    for entry in table.values():
        advance(entry, args.window + 1)  # compile, then run through one update
    per_step: dict[str, list[float]] = {name: [] for name in table}
    names = list(table)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            per_step[name].append(advance(table[name], args.window))
    ratios = {name: statistics.median(t / d for t, d in zip(per_step[name], per_step["dense"],
                                                            strict=True))
              for name in names}

    # Every step an update: the cost of moving the mask.
    table = prepare({k: v for k, v in methods(optimizer, args.sparsity, args.window,
                                               every=1).items() if k in ("set", "rigl", "snfs")})
    for entry in table.values():
        advance(entry, 3)
    update_step = {name: [] for name in table}
    for _ in range(max(2, args.rounds // 2)):
        for name in table:
            update_step[name].append(advance(table[name], args.update_steps))
    dense_ms = 1e3 * statistics.median(per_step["dense"])

    result = {
        "model": "lenet300", "dataset": "mnist", "batch_size": 100,
        "sparsity": args.sparsity, "window_steps": args.window, "rounds": args.rounds,
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "ms_per_step_median": {n: 1e3 * statistics.median(v) for n, v in per_step.items()},
        "ratio_to_dense_median": ratios,
        "ms_per_step_all_rounds": {n: [1e3 * t for t in v] for n, v in per_step.items()},
        "ms_per_update_step_median": {n: 1e3 * statistics.median(v)
                                      for n, v in update_step.items()},
        "update_step_ratio_to_dense": {n: 1e3 * statistics.median(v) / dense_ms
                                       for n, v in update_step.items()},
        "notes": "amortised window: RigL updates every 100 steps, SET and SNFS every "
                 f"{args.window} steps; update_step: a mask update on every step",
        "provenance": provenance(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dst_timing.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = np.arange(len(names))
    ax.bar(xs, [ratios[n] for n in names], color="tab:blue")
    ax.axhline(1.0, color="gray", ls="--")
    ax.set_xticks(xs, names)
    ax.set_ylabel("time per step / dense step")
    ax.set_title(f"LeNet-300-100, batch 100, {100 * args.sparsity:.0f}% sparse, CPU")
    for x, n in zip(xs, names, strict=True):
        ax.text(x, ratios[n], f"{ratios[n]:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(RESULTS / "dst_timing.png", dpi=120)
    for n in names:
        print(f"{n:>7}: {1e3 * statistics.median(per_step[n]):.3f} ms/step, "
              f"x{ratios[n]:.2f} of dense")
    for n, v in update_step.items():
        print(f"{n:>7} update step: {1e3 * statistics.median(v):.2f} ms")


if __name__ == "__main__":
    main()
