"""Strong lottery tickets beyond MLPs (issue #32): Edge-Popup, biprop and the relaxed
Bernoulli gates (Gaussian and hard-concrete) on a Conv-4, a narrow ResNet-20 and a small
ViT, real MNIST, at 50 / 70 / 90 / 95% target sparsity, beside the dense-trained model of
the same width.

    .venv/bin/python experiments/strong_families_mnist.py [--models conv4 resnet20 vit]
        [--methods edge_popup biprop gates_gaussian gates_hard_concrete dense]
        [--sparsities 0.5 0.7 0.9 0.95] [--seeds 0] [--steps N] [--plot-only]

Every configuration is one run of ``--steps`` steps (default: the model's, ``STEPS``) at
batch 128, trained on 55,000 MNIST training images (5,000 held out as a validation split,
``VALIDATION_SIZE``, scored beside the test set; choices are made on it, never on the test
set). Conv-4 and ResNet-20 go through the harness (``sparsejax.harness.training.loop.train``,
the code path of ``sparsejax train``; a killed run resumes from its checkpoint); the ViT
(:class:`sparsejax.harness.models.vit_nnx.ViTNNX`) goes through the user-facing form,
``sparsejax.nnx.sparsify`` on the NNX module with ``sparsejax.nnx.Optimizer`` and a plain
``nnx.jit`` train step (a killed ViT run starts again; one takes about a minute). Each
summary is appended to experiments/results/strong_families_mnist.json as soon as it
finishes and the plot experiments/results/strong_families_mnist.png is redrawn;
configurations already in the JSON file are skipped, so the script can be rerun or
resumed at any time.

Set up as the papers treat it: everything frozen but the method's per-weight variables
(no biases; the ResNet's batch norm without learned scale or bias, running statistics
kept, as Edge-Popup; the ViT's LayerNorms and position table frozen at their init), every
kernel masked (first layer and classifier included), one top-k per layer. Weights: the
scaled variants of each method's init (``scaled_signed_constant`` for Edge-Popup and the
gates, ``scaled_kaiming_normal`` for biprop), since Conv-4 and the ViT have no batch norm
to undo the shrinking of the activations by sqrt(density) per layer (Conv-4 at 90% with the
unscaled signed constant did not move off chance in 300 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from strong_common import RESULTS, ROOT, load, mnist_dir, save, train_once  # noqa: E402

OUTPUT = RESULTS / "strong_families_mnist.json"
RUNS = ROOT / "runs" / "strong_families"
SPARSITIES = (0.5, 0.7, 0.9, 0.95)
VALIDATION_SIZE = 5_000
BATCH = 128

# The models: harness name and options (the ViT is built in NNX below).
MODELS: dict[str, dict[str, Any]] = {
    "conv4": {"model": "conv4", "options": {"width": 0.25, "use_bias": False}},
    "resnet20": {"model": "resnet20", "options": {"width": 0.5, "use_bias": False,
                                                  "norm_affine": False}},
    "vit": {"model": "vit_nnx", "options": {"image_size": 28, "channels": 1, "patch_size": 7,
                                            "embed_dim": 64, "depth": 4, "num_heads": 4,
                                            "mlp_ratio": 2.0, "use_bias": False}},
}
STEPS = {"conv4": 300, "resnet20": 300, "vit": 800}

# The methods: training fields and method options. Edge-Popup and biprop: the paper's SGD
# setup (momentum 0.9, lr 0.1 cosine, weight decay on the scores); the gates: the recipe
# measured on LeNet-300-100 (docs/results.md, gates/mlp), Adam 0.05 cosine, no decay.
_SGD = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
        "lr_schedule": "cosine"}
_ADAM_GATES = {"optimizer": "adam", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
               "lr_schedule": "cosine"}
METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "edge_popup": ("edge_popup", _SGD, {"weight_init": "scaled_signed_constant"}),
    "biprop": ("biprop", _SGD, {"weight_init": "scaled_kaiming_normal"}),
    "gates_gaussian": ("gates", _ADAM_GATES, {
        "gate": "gaussian", "lam_rate": 2.0, "score_bounds": [-1.0, 1.5],
        "weight_init": "scaled_signed_constant", "sigma_final": 0.05}),
    "gates_hard_concrete": ("gates", _ADAM_GATES, {
        "gate": "hard_concrete", "lam_rate": 0.5, "weight_init": "scaled_signed_constant"}),
    # the reference line: the same model with its own init, every weight trained
    "dense": ("dense", {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
                        "weight_decay": 0.0, "lr_schedule": "cosine"}, {}),
}
LABELS = {"edge_popup": "Edge-Popup", "biprop": "biprop", "gates_gaussian": "gates (Gaussian)",
          "gates_hard_concrete": "gates (hard-concrete)", "dense": "dense"}


def run_name(model: str, method: str, sparsity: float | None, steps: int, seed: int) -> str:
    level = "" if sparsity is None else f"_s{sparsity}"
    return f"{model}_{method}{level}_n{steps}_s{seed}"


def harness_run(name: str, model: str, method: str, sparsity: float | None, steps: int,
                seed: int) -> dict[str, Any]:
    """One harness run (the code path of ``sparsejax train``); resumes if killed."""
    from sparsejax.harness.training.loop import TrainConfig

    registered, training, options = METHODS[method]
    out = RUNS / name
    config = TrainConfig(
        method=registered, model=MODELS[model]["model"], dataset="mnist", data_dir=mnist_dir(),
        sparsity=sparsity, steps=steps, seed=seed, out=str(out), progress=False,
        keep_checkpoints=1, checkpoint_every=200, eval_every=steps, log_every=100,
        validation_size=VALIDATION_SIZE, batch_size=BATCH, recipe="none", tensorboard=False,
        model_options=dict(MODELS[model]["options"]), method_options=dict(options),
        # the recorded test_accuracy is with training's running statistics (the harness's
        # evaluation when these ran); --recalibrate adds the recomputed one beside it
        bn_recalibration_batches=0, **training)
    config.resume = out.exists()
    result = train_once(config)
    return {"test_accuracy": result["test_accuracy"],
            "validation_accuracy": result.get("validation_accuracy"),
            "measured_sparsity": result["sparsity"], "wall_seconds": result["wall_seconds"],
            "steps": result["steps"], "run_dir": str(out.relative_to(ROOT)),
            "path": "harness (sparsejax.harness.training.loop.train)"}


def nnx_run(model: str, method: str, sparsity: float | None, steps: int,
            seed: int) -> dict[str, Any]:
    """One ViT run through the user-facing form: ``sparsejax.nnx.sparsify`` on the NNX
    module, ``sparsejax.nnx.Optimizer``, ``sparsejax.nnx.penalty`` in the loss."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import sparsejax.nnx
    from sparsejax.core.masks import sparsity_report
    from sparsejax.harness.data import load_dataset, split_validation
    from sparsejax.harness.data.stream import steps_per_epoch, train_batches
    from sparsejax.harness.models.vit_nnx import ViTNNX
    from sparsejax.harness.training.optim import make_optimizer

    started = time.time()
    registered, training, options = METHODS[method]
    data, validation = split_validation(load_dataset("mnist", mnist_dir()), VALIDATION_SIZE)
    module = ViTNNX(10, **MODELS[model]["options"], rngs=nnx.Rngs(seed))
    tx = make_optimizer(training["optimizer"], training["lr"], total_steps=steps,
                        momentum=training["momentum"], weight_decay=training["weight_decay"],
                        lr_schedule=training["lr_schedule"])
    sparse = method != "dense"
    if sparse:
        extra = {"total_steps": steps} if registered == "gates" else {}
        if registered == "biprop":
            extra = {"batches_per_epoch": steps_per_epoch(len(data.train_labels), BATCH)}
        module = sparsejax.nnx.sparsify(module, registered, rng=seed, other_params="frozen",
                                        sparsity=sparsity, **options, **extra)
        optimizer = sparsejax.nnx.Optimizer(module, tx)
    else:
        optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(module: Any, optimizer: Any, images: jax.Array, labels: jax.Array) -> Any:
        def loss_fn(module: Any) -> jax.Array:
            logits = module(images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss + sparsejax.nnx.penalty(module) if sparse else loss

        loss, grads = nnx.value_and_grad(loss_fn)(module)
        optimizer.update(module, grads)
        return loss

    @nnx.jit
    def correct(module: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
        return jnp.sum(jnp.argmax(module(images), -1) == labels)

    def accuracy(images: np.ndarray, labels: np.ndarray) -> float:
        hits = sum(int(correct(module, images[i:i + 1000], labels[i:i + 1000]))
                   for i in range(0, len(labels), 1000))
        return hits / len(labels)

    stream = train_batches(data, BATCH, seed)
    setup_seconds = time.time() - started
    for i in range(steps):
        _, batch = next(stream)
        loss = train_step(module, optimizer, jnp.asarray(batch["image"]),
                          jnp.asarray(batch["label"]))
        if i == 0:
            float(loss)
            first = time.time()
    float(loss)
    loop_seconds = time.time() - first
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"{model} {method}: the loss is {float(loss)}")
    module.eval()  # hard masks, no gate noise
    if sparse:
        measured = float(sparsity_report(jax.device_get(
            sparsejax.nnx.effective_params(module)))[-1].sparsity)
    else:
        measured = 0.0
    result = {"test_accuracy": accuracy(data.test_images, data.test_labels),
              "validation_accuracy": accuracy(validation.test_images, validation.test_labels),
              "measured_sparsity": measured, "steps": steps,
              "setup_seconds": setup_seconds, "seconds_per_step": loop_seconds / max(steps - 1, 1),
              "path": "sparsejax.nnx.sparsify on the NNX ViT" if sparse
              else "nnx.Optimizer on the NNX ViT"}
    jax.clear_caches()
    result["wall_seconds"] = time.time() - started
    return result


RECALIBRATION_BATCHES = 40


def recalibrated(run_dir: Path) -> dict[str, float]:
    """Test and validation accuracy of a finished harness run's hard mask with the batch
    norm statistics recomputed for it over ``RECALIBRATION_BATCHES`` training batches of
    128 (:func:`sparsejax.harness.training.batch_norm.recalibrated_batch_stats`, which
    ``sparsejax train`` now applies to the gates by default), in place of the running
    averages training left. The gates train through relaxed gates (soft, noisy), so their
    running averages describe that network, not the binary one that is evaluated;
    Edge-Popup and biprop train through their hard masks (a control)."""
    import jax

    from sparsejax.harness.prune_run import restore_run
    from sparsejax.harness.training.batch_norm import (
        recalibrated_batch_stats,
        recalibration_images,
    )
    from sparsejax.harness.training.evaluation import evaluate, make_eval_step

    finished = restore_run(ROOT / run_dir)
    run, state = finished.run, finished.state
    params = run.method.effective_params(state)
    images = recalibration_images(run.dataset.train_images, RECALIBRATION_BATCHES, BATCH,
                                  seed=0)
    merged = recalibrated_batch_stats(run.model, params, state.model_state, images)
    eval_step = jax.jit(make_eval_step(run.model))
    test = evaluate(eval_step, (params, merged), run.dataset)
    held = evaluate(eval_step, (params, merged), run.validation)
    jax.clear_caches()
    return {"test_accuracy_bn_recalibrated": test["accuracy"],
            "validation_accuracy_bn_recalibrated": held["accuracy"]}


def summary(runs: dict[str, Any]) -> dict[str, Any]:
    """Mean and sample std (n - 1) over seeds per (model, method, target sparsity)."""
    groups: dict[tuple[str, str, Any, int], list[dict[str, Any]]] = {}
    for r in runs.values():
        groups.setdefault((r["model"], r["method"], r["target_sparsity"], r["steps"]),
                          []).append(r)
    out = {}
    for (model, method, target, steps), records in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0, kv[0][3])):
        records.sort(key=lambda r: r["seed"])
        accs = [100 * r["test_accuracy"] for r in records]
        vals = [100 * r["validation_accuracy"] for r in records]
        out[f"{model}/{method}/{target}/n{steps}"] = {
            "model": model, "method": method, "target_sparsity": target, "steps": steps,
            "seeds": [r["seed"] for r in records], "test_accuracy_percent": accs,
            "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else None,
            "validation_mean": statistics.mean(vals),
            "measured_sparsity_mean": statistics.mean(r["measured_sparsity"] for r in records),
            "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in records),
        }
        if all("test_accuracy_bn_recalibrated" in r for r in records):
            out[f"{model}/{method}/{target}/n{steps}"]["bn_recalibrated_mean"] = (
                statistics.mean(100 * r["test_accuracy_bn_recalibrated"] for r in records))
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = list(payload["summary"].values())
    rows = [r for r in every if r["steps"] == STEPS[r["model"]]]  # the grid's budget
    longer = [r for r in every if r["steps"] > STEPS[r["model"]]]
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for method, marker in zip([m for m in METHODS if m != "dense"],
                                  itertools.cycle("osd^"), strict=False):
            points = sorted((100 * r["measured_sparsity_mean"], r["mean"], r["std"] or 0.0)
                            for r in rows if r["model"] == model and r["method"] == method)
            if points:
                xs, ys, errs = zip(*points, strict=True)
                line = ax.errorbar(xs, ys, yerr=errs, marker=marker, capsize=3,
                                   label=LABELS[method])
                recal = sorted((100 * r["measured_sparsity_mean"], r["bn_recalibrated_mean"])
                               for r in rows if r["model"] == model and r["method"] == method
                               and "bn_recalibrated_mean" in r)
                if recal and method.startswith("gates"):  # batch norm of the binary mask
                    ax.plot(*zip(*recal, strict=True), marker=marker, linestyle="--",
                            color=line[0].get_color(), alpha=0.6,
                            label=f"{LABELS[method]}, batch norm recomputed")
                for r in longer:  # the same method with more steps: a hollow marker
                    if r["model"] == model and r["method"] == method:
                        ax.errorbar([100 * r["measured_sparsity_mean"]], [r["mean"]],
                                    yerr=[r["std"] or 0.0], marker=marker, markersize=9,
                                    mfc="none", capsize=3, color=line[0].get_color(),
                                    label=f"{LABELS[method]}, {r['steps']} steps")
        for r in rows:
            if r["model"] == model and r["method"] == "dense":
                ax.axhline(r["mean"], color="gray", linestyle=":",
                           label=f"dense ({r['mean']:.2f}%)")
                break
        ax.set_title(f"{model}, MNIST, {STEPS[model]} steps (hollow: longer)", fontsize=10)
        ax.set_xlabel("measured sparsity of the mask (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Strong tickets over frozen weights (mean ± std where several seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(payload: dict[str, Any]) -> str:
    """docs/results.md's table: one row per model and method, one column per target
    sparsity; a cell is the test accuracy (mean ± sample std over n seeds where n > 1) and
    the measured sparsity; then the steps and the mean wall time of one run."""
    rows = [r for r in payload["summary"].values() if r["steps"] == STEPS[r["model"]]]
    lines = ["| model | method | " + " | ".join(f"{int(100 * t)}%" for t in SPARSITIES)
             + " | steps | s / run |", "|---|---|" + "---|" * len(SPARSITIES) + "---|---|"]
    for model in MODELS:
        for method in METHODS:
            mine = [r for r in rows if r["model"] == model and r["method"] == method]
            if not mine:
                continue
            cells = []
            for target in [None] if method == "dense" else SPARSITIES:
                r = next((r for r in mine if r["target_sparsity"] == target), None)
                if r is None:
                    cells.append("")
                    continue
                std = f" ± {r['std']:.2f} (n={len(r['seeds'])})" if r["std"] is not None else ""
                recal = (f" → {r['bn_recalibrated_mean']:.2f}" if "bn_recalibrated_mean" in r
                         and not method.startswith("edge") else "")
                cells.append(f"{r['mean']:.2f}{std}{recal} "
                             f"[{100 * r['measured_sparsity_mean']:.2f}]")
            if method == "dense":
                cells = [f"{cells[0]} (dense, every weight trained)"] + [""] * (
                    len(SPARSITIES) - 1)
            time_mean = statistics.mean(r["wall_seconds_mean"] for r in mine)
            lines.append(f"| {model} | {LABELS[method]} | " + " | ".join(cells)
                         + f" | {mine[0]['steps']} | {time_mean:.0f} |")
    longer = [r for r in payload["summary"].values() if r["steps"] > STEPS[r["model"]]]
    if longer:
        lines += ["", "| model | method | target | test accuracy | measured sparsity | steps "
                  "| s / run |", "|---|---|---|---|---|---|---|"]
        for r in longer:
            lines.append(f"| {r['model']} | {LABELS[r['method']]} | "
                         f"{int(100 * r['target_sparsity'])}% | {r['mean']:.2f} | "
                         f"{100 * r['measured_sparsity_mean']:.2f}% | {r['steps']} | "
                         f"{r['wall_seconds_mean']:.0f} |")
    return "\n".join(lines)


def refresh(payload: dict[str, Any]) -> dict[str, Any]:
    on_disk = load(OUTPUT)
    payload["runs"] = {**on_disk.get("runs", {}), **payload.get("runs", {})}
    payload["summary"] = summary(payload["runs"])
    payload["setup"] = {
        "data": f"real MNIST, {VALIDATION_SIZE} training images held out for validation, "
                "test accuracy on the 10,000 test images",
        "models": MODELS, "methods": {k: {"registered": v[0], "training": v[1],
                                          "method_options": v[2]} for k, v in METHODS.items()},
        "batch_size": BATCH,
    }
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of every run (default: the model's, STEPS)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--recalibrate", action="store_true",
                        help="recompute the batch norm statistics of the finished ResNet runs "
                             "for their binary masks (the gates runs, Edge-Popup at 90%% as a "
                             "control) and record the accuracies beside the others")
    parser.add_argument("--table", action="store_true",
                        help="print docs/results.md's markdown table and stop")
    args = parser.parse_args()
    payload = refresh({"runs": {}})
    if args.table:
        print(markdown_table(payload))
        return
    if args.recalibrate:
        for name, r in sorted(load(OUTPUT)["runs"].items()):
            control = r["method"] == "edge_popup" and r["target_sparsity"] == 0.9
            if (r["model"] == "resnet20" and "run_dir" in r and "bn_recalibrated" not in r
                    and (r["method"].startswith("gates") or control)):
                extra = recalibrated(Path(r["run_dir"]))
                print(f"{name}: test {100 * r['test_accuracy']:.2f}% -> "
                      f"{100 * extra['test_accuracy_bn_recalibrated']:.2f}% with batch norm "
                      "statistics of the binary mask", flush=True)
                payload = refresh(payload)
                payload["runs"][name] = {**payload["runs"][name], **extra,
                                         "bn_recalibrated": True}
                save(OUTPUT, refresh(payload))
        return
    jobs = []
    for seed, model, method in itertools.product(args.seeds, args.models, args.methods):
        for sparsity in [None] if method == "dense" else args.sparsities:
            jobs.append((model, method, sparsity, args.steps or STEPS[model], seed))
    for model, method, sparsity, steps, seed in [] if args.plot_only else jobs:
        name = run_name(model, method, sparsity, steps, seed)
        if name in payload["runs"]:
            continue
        started = time.time()
        if model == "vit":
            result = nnx_run(model, method, sparsity, steps, seed)
        else:
            result = harness_run(name, model, method, sparsity, steps, seed)
        print(f"{name}: test {100 * result['test_accuracy']:.2f}% validation "
              f"{100 * result['validation_accuracy']:.2f}% at sparsity "
              f"{100 * result['measured_sparsity']:.2f}% in {time.time() - started:.0f} s",
              flush=True)
        payload = refresh(payload)
        payload["runs"][name] = {"model": model, "method": method, "target_sparsity": sparsity,
                                 "seed": seed, **result}
        payload = refresh(payload)
        save(OUTPUT, payload)
        plot(payload, OUTPUT.with_suffix(".png"))
    payload = refresh(payload)
    if not args.plot_only:  # --plot-only writes the plot alone (a grid may be running)
        save(OUTPUT, payload)
    plot(payload, OUTPUT.with_suffix(".png"))
    for r in payload["summary"].values():
        std = f" ± {r['std']:.2f}" if r["std"] is not None else ""
        print(f"{r['model']:9s} {r['method']:20s} {r['target_sparsity']!s:5s} "
              f"{r['mean']:6.2f}{std} (n={len(r['seeds'])}) val {r['validation_mean']:6.2f} "
              f"sparsity {100 * r['measured_sparsity_mean']:6.2f}% "
              f"{r['wall_seconds_mean']:.0f} s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
