"""Issue #22: the gates must land within half a point of the target sparsity. The tuned
recipe (``scaled_anneal`` of experiments/gates_mnist.py: LeNet-300-100 without biases,
Adam 0.05 cosine, batch 128, Gaussian gate, ``lam_rate`` 2, bounds [-1, 1.5], scaled
signed constant weights, noise annealed to 0.05) landed 0.4-11.8 points sparser than the
target with the old hard-mask rule ``binarize='topk'`` (a gate closed at test time is
never switched on, and with the anneal the loss alone closes more gates than asked).

    .venv/bin/python experiments/gates_exact_sparsity.py [--epochs 40]
        [--targets 0.5 0.7 0.9 0.8 0.95] [--seeds 0] [--variant exact]

The recorded results come from ``--variant exact`` and ``--variant lift2`` (all five
targets, seed 0), ``--targets 0.5 --variant lift0.2|lift20|lift2c|lift20c`` (seed 0),
``--variant lift2z --targets 0.9 0.5 0.7 0.95 0.8`` (seed 0) and ``--variant lift2z
--targets 0.5 0.9 0.7 --seeds 1 2``. ``lift2z`` is what the gates do by default with a
target sparsity (``binarize='exact'``, ``lift_rate=2``, ``lift_scope='all'``,
``lift_with_lam=False``).

Every configuration is one ``sparsejax.harness.training.loop.train`` run (the code path of
``sparsejax train``) in ``runs/gates_exact/<name>`` (ignored by git), trained with the
variant's method options. Its final checkpoint is then scored under every hard-mask
rule (``exact``, ``topk``, ``open``) on the 10,000 test images: the rule acts on the
final gate parameters only (never in a training step), so the rules are compared on one
and the same trained state. The summary goes into
experiments/results/gates_exact_sparsity.json as soon as a run finishes (with
``provenance``), the plot experiments/results/gates_exact_sparsity.png is redrawn, and
configurations already in the JSON file are skipped: the script can be rerun or resumed
at any time (a killed run continues from its checkpoint).

``recorded`` holds the numbers of docs/results.md ("Scaled weights and annealed noise",
40 epochs, ``binarize='topk'``) for the same seed and target, to compare against.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from strong_common import RESULTS, ROOT, epoch_curve, load, mnist_dir, save, train_once  # noqa: E402

from sparsejax.harness.training.loop import (  # noqa: E402
    TrainConfig,
    evaluate,
    make_eval_step,
    measured_sparsity,
    prepare,
)
from sparsejax.harness.training.recipes import RECIPES  # noqa: E402
from sparsejax.io.checkpoint import Checkpointer  # noqa: E402

OUTPUT = RESULTS / "gates_exact_sparsity.json"
RUNS = ROOT / "runs" / "gates_exact"
TARGETS = (0.5, 0.7, 0.9, 0.8, 0.95)
RULES = ("exact", "topk", "open")

# The recipe scaled_anneal of experiments/gates_mnist.py: the library's gates recipe.
TRAINING = {k: v for k, v in RECIPES["gates/mlp"].training.items() if k != "epochs"}
RECIPE = dict(RECIPES["gates/mlp"].method_options)
# Variants: tag -> method option changes to RECIPE (the training differs only if an
# option other than binarize changes).
VARIANTS: dict[str, dict[str, Any]] = {
    "exact": {"binarize": "exact"},  # (a) the rule alone: training as recorded
    # (a) + (b): the lift opens the closed gates closest to opening during training
    # whenever fewer gates are open than the target density asks
    # lift_scope 'all': every gate raised (open ones run into the upper bound); these
    # first ones lift while lam > 0 too (lift_with_lam), fighting the controller
    "lift0.2": {"binarize": "exact", "lift_rate": 0.2, "lift_scope": "all",
                "lift_with_lam": True},
    "lift2": {"binarize": "exact", "lift_rate": 2.0, "lift_scope": "all",
              "lift_with_lam": True},
    "lift20": {"binarize": "exact", "lift_rate": 20.0, "lift_scope": "all",
               "lift_with_lam": True},
    # lift_scope 'closed': only the closed gates raised
    "lift2c": {"binarize": "exact", "lift_rate": 2.0, "lift_scope": "closed",
               "lift_with_lam": True},
    "lift20c": {"binarize": "exact", "lift_rate": 20.0, "lift_scope": "closed",
                "lift_with_lam": True},
    # the lift only once lam has fallen to 0 (the default of lift_with_lam)
    "lift2z": {"binarize": "exact", "lift_rate": 2.0, "lift_scope": "all",
               "lift_with_lam": False},
}

# docs/results.md, "Scaled weights and annealed noise" (gates scaled_anneal, 40 epochs,
# binarize='topk'): target -> seed -> (test accuracy %, measured sparsity %), from
# experiments/results/gates_mnist.json.
RECORDED_40: dict[float, dict[int, tuple[float, float]]] = {
    0.5: {0: (98.14, 61.21), 1: (98.16, 62.00), 2: (98.12, 62.12)},
    0.7: {0: (98.12, 72.74), 1: (98.18, 72.77), 2: (98.07, 72.69)},
    0.8: {0: (98.06, 81.22), 1: (98.01, 81.23), 2: (98.03, 81.25)},
    0.9: {0: (97.80, 90.48), 1: (97.75, 90.47), 2: (97.67, 90.42)},
    0.95: {0: (97.01, 95.41), 1: (97.08, 95.49), 2: (97.36, 95.31)},
}


def config_for(name: str, target: float, epochs: int, seed: int,
               options: dict[str, Any]) -> TrainConfig:
    return TrainConfig(
        method="gates", model="lenet300", dataset="mnist", data_dir=mnist_dir(),
        sparsity=target, epochs=epochs, seed=seed, out=str(RUNS / name), progress=False,
        keep_checkpoints=1, log_every=200, model_options={"use_bias": False},
        method_options=dict(options), **TRAINING)


def score_rules(config: TrainConfig) -> dict[str, Any]:
    """The final checkpoint of ``config``'s run scored under every hard-mask rule, plus
    statistics of the final gate parameters."""
    out: dict[str, Any] = {}
    state = None
    for rule in RULES:
        options = {**config.method_options, "binarize": rule}
        run = prepare(dataclasses.replace(config, method_options=options, resume=False))
        if state is None:
            checkpointer = Checkpointer(Path(config.out) / "checkpoints", max_to_keep=None)
            step, state, _ = checkpointer.restore(run.state)
            checkpointer.close()
            out["checkpoint_step"] = int(step)
        params = jax.jit(run.method.effective_params)(state)
        metrics = evaluate(jax.jit(make_eval_step(run.model)), (params, state.model_state),
                           run.dataset)
        out[rule] = {"test_accuracy": float(metrics["accuracy"]),
                     "measured_sparsity": float(measured_sparsity(params))}
    mu = np.concatenate([np.asarray(s).ravel() for s in jax.tree_util.tree_leaves(state.scores)
                         if np.size(s)])
    n = mu.size
    k = round((1.0 - config.sparsity) * n)
    order = np.sort(mu)[::-1]
    out["gates"] = {
        "n": int(n), "k": int(k), "open": int(np.sum(mu > 0)),
        "open_fraction": float(np.mean(mu > 0)),
        "at_upper_bound": int(np.sum(mu >= 1.5)), "at_lower_bound": int(np.sum(mu <= -1.0)),
        "kth_largest_mu": float(order[k - 1]) if k else None,
        "lam_final": float(state.extra["lam"]),
        "mu_quantiles": {str(q): float(np.quantile(mu, q)) for q in
                         (0.05, 0.25, 0.5, 0.75, 0.95)},
    }
    return out


def run_one(name: str, target: float, epochs: int, seed: int, variant: str) -> dict[str, Any]:
    options = {**RECIPE, **VARIANTS[variant]}
    config = config_for(name, target, epochs, seed, options)
    out = Path(config.out)
    result_file = out / "result.json"
    started = time.time()
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        config.resume = out.exists()
        result = train_once(config)
    print(f"{name}: {100 * result['test_accuracy']:.2f}% at sparsity "
          f"{100 * result['sparsity']:.2f}% in {time.time() - started:.0f} s "
          f"({result['steps'] / max(result['wall_seconds'], 1e-9):.1f} steps/s)", flush=True)
    rules = score_rules(config)
    jax.clear_caches()
    recorded = (RECORDED_40.get(target, {}).get(seed) if epochs == 40 else None)
    return {
        "variant": variant, "target_sparsity": target, "epochs": epochs, "seed": seed,
        "training": dict(TRAINING), "method_options": options,
        "test_accuracy": result["test_accuracy"], "measured_sparsity": result["sparsity"],
        "wall_seconds": result["wall_seconds"], "steps": result["steps"],
        "steps_per_second": result["steps"] / result["wall_seconds"],
        "rules": rules,
        "recorded_topk": None if recorded is None else {
            "test_accuracy_percent": recorded[0], "measured_sparsity_percent": recorded[1]},
        "test_accuracy_per_epoch": epoch_curve(out), "run_dir": str(out.relative_to(ROOT)),
    }


def plot(payload: dict[str, Any], path: Path) -> None:
    """Left: measured minus target sparsity; right: test accuracy against measured
    sparsity. The recipe's own training under the old rule ('topk', recorded) and under
    'exact'; every lift variant under 'exact' (its default). Means over the seeds run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for r in payload["runs"].values():
        t = 100 * r["target_sparsity"]
        rules = [("topk", "recipe, binarize='topk' (as recorded)"),
                 ("exact", "recipe, binarize='exact'")] if r["variant"] == "exact" else [
                     ("exact", f"{r['variant']}, binarize='exact'")]
        for rule, label in rules:
            lines.setdefault(label, {}).setdefault(t, []).append(
                (100 * r["rules"][rule]["measured_sparsity"],
                 100 * r["rules"][rule]["test_accuracy"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, marker in zip(sorted(lines), "osd^v<>Xp*", strict=False):
        pts = sorted((t, float(np.mean([m for m, _ in v])), float(np.mean([a for _, a in v])))
                     for t, v in lines[label].items())
        ts, ms, accs = zip(*pts, strict=True)
        ax1.plot(ts, [m - t for t, m in zip(ts, ms, strict=True)], marker=marker, label=label)
        ax2.plot(ms, accs, marker=marker, label=label)
    ax1.axhspan(-0.5, 0.5, color="green", alpha=0.15, label="issue #22: within 0.5")
    ax1.set_xlabel("target sparsity (%)")
    ax1.set_ylabel("measured - target (points)")
    ax2.set_xlabel("measured sparsity (%)")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(95.5, 98.5)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7, loc="lower left")
    fig.suptitle("Gates scaled_anneal, LeNet-300-100 / MNIST, 40 epochs: hard-mask rule and "
                 "lift (mean over the seeds run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default="exact")
    args = parser.parse_args()
    payload = load(OUTPUT)
    payload.setdefault("runs", {})
    payload["setup"] = (
        "LeNet-300-100 without biases, real MNIST (10k test images), gates recipe "
        f"scaled_anneal: training {TRAINING}, method options {RECIPE} plus the variant's. "
        "Each run's final checkpoint scored under the hard-mask rules "
        f"{list(RULES)}; recorded_topk = docs/results.md (40 epochs, binarize='topk').")
    save(OUTPUT, payload)
    for seed in args.seeds:
        for target in args.targets:
            name = f"gates_{args.variant}_s{target}_e{args.epochs}_s{seed}"
            if name in load(OUTPUT).get("runs", {}):
                continue
            entry = run_one(name, target, args.epochs, seed, args.variant)
            payload = load(OUTPUT)
            payload.setdefault("runs", {})[name] = entry
            save(OUTPUT, payload)
            plot(payload, OUTPUT.with_suffix(".png"))
            r = entry["rules"]
            print(f"  exact {100 * r['exact']['test_accuracy']:.2f}% at "
                  f"{100 * r['exact']['measured_sparsity']:.2f}%; topk "
                  f"{100 * r['topk']['test_accuracy']:.2f}% at "
                  f"{100 * r['topk']['measured_sparsity']:.2f}%; open fraction "
                  f"{r['gates']['open_fraction']:.4f}; recorded {entry['recorded_topk']}",
                  flush=True)
    plot(load(OUTPUT), OUTPUT.with_suffix(".png"))


if __name__ == "__main__":
    main()
