"""Block-by-block one-shot post-training pruning of a small GPT and a small LLaMA on
tinyshakespeare, head and embeddings dense (the Wanda/SparseGPT reference setting).

Trains the default ``gpt`` (4 layers, 128 wide, 4 heads, context 64) and the default
``llama`` (4 layers, 128 wide, RMSNorm, RoPE, SwiGLU) dense with the recipe of
docs/results.md's GPT section (``--steps 2000 --batch-size 64 --optimizer adam --lr 1e-3
--recipe none --eval-every 500``, cosine schedule, seed 0) through ``sparsejax train``
into ``runs/posttrain_blocks_gpt_dense`` and ``runs/posttrain_blocks_llama_dense`` (a
finished run there is reused; ``LLAMA_STEPS`` below says how many steps the llama got:
the JSON's ``train_args`` record it). Then prunes the Dense/Linear kernels of every
transformer block one-shot, no retraining, with ``prune_blocks`` (block after block on
cached activations, every layer of a block calibrated on the dense block's inputs,
``within="block_inputs"``; the head and the embeddings stay dense), with magnitude, Wanda
and SparseGPT at 50% unstructured, 2:4 and 4:8, from 128 calibration training windows of
64 characters drawn with calibration seeds 0, 1, 2 (magnitude uses no data: one run).
Seed 0 runs across the whole grid (both models) first, then seeds 1 and 2. Records the
validation loss (nats per character on the whole held-out last 10% of the text) and
accuracy, the measured sparsity (of all prunable kernels, head included, and of the
blocks' kernels alone), each layer's relative reconstruction error and the prune wall
time (``prune_blocks`` alone, compilation included, no evaluation).

    nice -n 5 .venv/bin/python experiments/posttrain_blocks_shakespeare.py

writes experiments/results/posttrain_blocks_shakespeare.json after every run (rerunnable:
configurations already there are skipped) and .png, and copies each dense run's
result.json and metrics.jsonl into experiments/results/posttrain_blocks_dense/<model>/.
``--plot-only`` redraws the PNG from the JSON (no training, no pruning).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

from sparsejax.core.masks import sparsity_report
from sparsejax.harness.cli import main as sparsejax_main
from sparsejax.harness.models import NNXModel
from sparsejax.harness.prune_run import model_blocks, restore_run
from sparsejax.harness.training.evaluation import measured_sparsity
from sparsejax.harness.training.loop import evaluate, make_eval_step
from sparsejax.posttrain.blocks import prune_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))

from strong_common import load, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
OUT = RESULTS / "posttrain_blocks_shakespeare.json"
DENSE_COPIES = RESULTS / "posttrain_blocks_dense"
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare"
MODELS = ("gpt", "llama")
GPT_STEPS = 2000
LLAMA_STEPS = 2000
RECIPE = ["--method", "dense", "--dataset", "tinyshakespeare", "--batch-size", "64",
          "--optimizer", "adam", "--lr", "1e-3", "--recipe", "none", "--eval-every", "500",
          "--seed", "0"]
SETTINGS = [("unstructured", 0.5), ("2:4", None), ("4:8", None)]
METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATION_SIZE = 128
CALIBRATION_SEEDS = (0, 1, 2)
WITHIN = "block_inputs"


def label(pattern: str, sparsity: float | None) -> str:
    return pattern if sparsity is None else f"{round(sparsity * 100)}% unstructured"


def train_args(model: str) -> list[str]:
    steps = GPT_STEPS if model == "gpt" else LLAMA_STEPS
    return ["--model", model, *RECIPE, "--steps", str(steps)]


def run_dir(model: str) -> Path:
    return ROOT / "runs" / f"posttrain_blocks_{model}_dense"


def trained_run(model: str) -> Path:
    """The finished dense run of ``model`` (trained here when absent), its result.json and
    metrics.jsonl copied into experiments/results/posttrain_blocks_dense/<model>/."""
    out = run_dir(model)
    if not (out / "result.json").exists():
        code = sparsejax_main(["train", *train_args(model), "--data-dir", str(DATA),
                               "--out", str(out), "--no-progress", "--no-tensorboard"])
        if code != 0:
            raise SystemExit(f"training the dense {model} failed ({code})")
    (DENSE_COPIES / model).mkdir(parents=True, exist_ok=True)
    for name in ("result.json", "metrics.jsonl"):
        shutil.copyfile(out / name, DENSE_COPIES / model / name)
    return out


def key(model: str, setting: str, method: str, seed: int | None) -> str:
    return f"{model}|{setting}|{method}|{'none' if seed is None else seed}"


def summarise(payload: dict) -> dict:
    """Per model, setting and method: mean and sample std (``ddof=1``) of the validation
    loss over the calibration seeds done, and the mean prune time."""
    summary: dict = {}
    runs = list(payload["runs"].values())
    for model in MODELS:
        for pattern, sparsity in SETTINGS:
            name = label(pattern, sparsity)
            for method in METHODS:
                chosen = [r for r in runs if r["model"] == model and r["setting"] == name
                          and r["method"] == method]
                if not chosen:
                    continue
                loss = np.array([r["validation_loss"] for r in chosen])
                summary.setdefault(model, {}).setdefault(name, {})[method] = {
                    "validation_loss_mean": float(loss.mean()),
                    "validation_loss_std": float(loss.std(ddof=1)) if len(chosen) > 1 else None,
                    "validation_accuracy_mean": float(np.mean(
                        [r["validation_accuracy"] for r in chosen])),
                    "prune_seconds_mean": float(np.mean([r["prune_seconds"] for r in chosen])),
                    "seeds": len(chosen),
                }
    return summary


class Pruner:
    """A restored dense run, its validation evaluation and ``prune_blocks`` on it."""

    def __init__(self, model: str):
        self.dir = trained_run(model)
        finished = restore_run(self.dir, DATA)
        self.result, self.run = finished.result, finished.run
        self.params = jax.jit(self.run.method.effective_params)(finished.state)
        self.model_state = finished.state.model_state
        self.blocks = model_blocks(self.run.model)
        self.eval_step = jax.jit(make_eval_step(self.run.model))
        self.dense = self.validation(self.params)

    def validation(self, params: dict) -> dict:
        return evaluate(self.eval_step, (params, self.model_state), self.run.dataset)

    def prune(self, method: str, pattern: str, sparsity: float | None, inputs: np.ndarray):
        model = self.run.model
        if isinstance(model, NNXModel):
            module, report = prune_blocks(model.merge(self.params), None, inputs, method,
                                          pattern, sparsity, blocks=self.blocks, within=WITHIN)
            return model.params_of(module), report
        return prune_blocks(model, self.params, inputs, method, pattern, sparsity,
                            blocks=self.blocks, within=WITHIN, model_state=self.model_state,
                            apply_kwargs={"train": False})

    def blocks_sparsity(self, params: dict) -> float:
        """Sparsity of the kernels inside the blocks (what was pruned)."""
        prefixes = tuple(b + "/" for b in self.blocks)
        rows = [r for r in sparsity_report(jax.device_get(params))
                if r.prunable and r.path.startswith(prefixes)]
        return 1.0 - sum(r.kept for r in rows) / sum(r.size for r in rows)


def main() -> None:
    if sys.argv[1:] == ["--plot-only"]:
        plot(load(OUT))
        return
    t0 = time.time()
    payload = load(OUT)
    payload.update({
        "description": __doc__.strip().splitlines()[0],
        "dataset": "tinyshakespeare", "driver": "prune_blocks", "within": WITHIN,
        "head": "dense", "calibration_windows": CALIBRATION_SIZE,
        "calibration_seeds": list(CALIBRATION_SEEDS),
        "sparsegpt": {"blocksize": 128, "percdamp": 0.01}})
    payload.setdefault("dense", {})
    pruners: dict[str, Pruner] = {}
    for seed in CALIBRATION_SEEDS:
        for model in MODELS:
            todo = [(p, s, m) for p, s in SETTINGS for m in METHODS
                    if (m != "magnitude" or seed == CALIBRATION_SEEDS[0])
                    and key(model, label(p, s), m, None if m == "magnitude" else seed)
                    not in payload["runs"]]
            if not todo:
                continue
            if model not in pruners:
                pruners[model] = pruner = Pruner(model)
                payload["dense"][model] = {
                    "run": str(pruner.dir.relative_to(ROOT)), "train_args": train_args(model),
                    "train_seconds": pruner.result["wall_seconds"],
                    "validation_loss": pruner.dense["loss"],
                    "validation_accuracy": pruner.dense["accuracy"],
                    "sparsity": measured_sparsity(pruner.params), "blocks": pruner.blocks,
                    "context": int(pruner.run.dataset.train_images.shape[1])}
                print(f"{model}: dense validation loss {pruner.dense['loss']:.4f} nats/char "
                      f"(trained {pruner.result['wall_seconds']:.0f} s)", flush=True)
                save(OUT, payload)
            pruner = pruners[model]
            windows = pruner.run.dataset.train_images
            chosen = np.random.default_rng(seed).choice(len(windows), CALIBRATION_SIZE,
                                                        replace=False)
            inputs = windows[np.sort(chosen)]
            for pattern, sparsity, method in todo:
                start = time.time()
                pruned, report = pruner.prune(method, pattern, sparsity, inputs)
                pruned = jax.block_until_ready(pruned)
                seconds = time.time() - start
                after = pruner.validation(pruned)
                run_seed = None if method == "magnitude" else seed
                payload["runs"][key(model, label(pattern, sparsity), method, run_seed)] = {
                    "model": model, "method": method, "pattern": pattern,
                    "sparsity_target": 0.5 if sparsity is None else sparsity,
                    "setting": label(pattern, sparsity), "calibration_seed": run_seed,
                    "validation_loss": after["loss"], "validation_accuracy": after["accuracy"],
                    "sparsity": measured_sparsity(pruned),
                    "blocks_sparsity": pruner.blocks_sparsity(pruned),
                    "layers": [r._asdict() for r in report], "prune_seconds": seconds,
                }
                print(f"{model:5s} {label(pattern, sparsity):17s} {method:9s} seed {seed}: "
                      f"val loss {after['loss']:.4f}  ({seconds:.1f} s prune, "
                      f"{time.time() - start:.1f} s with evaluation)", flush=True)
                payload["summary"] = summarise(payload)
                save(OUT, payload)
    payload["summary"] = summarise(payload)
    save(OUT, payload)
    plot(payload)
    print(f"wrote {OUT} ({time.time() - t0:.0f} s)")


def plot(payload: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if m in payload.get("summary", {})]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    width = 0.26
    for ax, model in zip(axes[0], models, strict=True):
        summary = payload["summary"][model]
        settings = [label(p, s) for p, s in SETTINGS if label(p, s) in summary]
        for i, method in enumerate(METHODS):
            xs = np.arange(len(settings)) + (i - 1) * width
            rows = [summary[s].get(method) for s in settings]
            ax.bar(xs, [r["validation_loss_mean"] if r else np.nan for r in rows], width,
                   yerr=[(r["validation_loss_std"] or 0) if r else 0 for r in rows],
                   label=method, capsize=2)
        dense = payload["dense"][model]["validation_loss"]
        steps = payload["dense"][model]["train_args"]
        steps = steps[steps.index("--steps") + 1]
        ax.axhline(dense, color="black", lw=1, ls="--", label=f"dense {dense:.3f}")
        ax.set_ylim(bottom=1.4)
        ax.set_xticks(np.arange(len(settings)), settings, fontsize=8)
        ax.set_ylabel("validation loss (nats/char)")
        ax.set_title(f"{model} 4x128 ({steps} steps)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("tinyshakespeare: one-shot prune_blocks of every block's Dense/Linear kernel "
                 "(head, embeddings dense), no retraining\n"
                 f"({payload['calibration_windows']} calibration windows; mean and sample std "
                 "over the calibration seeds done)", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
