"""One-shot post-training pruning of a small GPT trained on tinyshakespeare.

Trains the default ``gpt`` (4 layers, 128 wide, 4 heads, context 64) dense for 2000 steps
at batch 64 (Adam, lr 1e-3 cosine, seed 0; the recipe of docs/results.md's GPT section),
through ``sparsejax train`` into ``runs/posttrain_gpt_dense`` (a finished run there is
reused). Then prunes every Dense kernel (attention query/key/value/out, MLP fc1/fc2 and
the head; embeddings and LayerNorms stay dense) one-shot, with no retraining, layer after
layer (``prune_sequential``: each layer, or the query/key/value group, calibrated on the
outputs of the layers already pruned), with magnitude, Wanda and SparseGPT at 50%
unstructured, 2:4, 4:8, 60%, 70% and 80% unstructured, from 128 calibration training
windows of 64 characters (8,192 tokens) drawn with 3 seeds (magnitude uses no calibration
data: one run). Records the validation loss (nats per character, the whole held-out last
10% of the text) and each layer's relative reconstruction error.

    nice -n 5 .venv/bin/python experiments/posttrain_gpt_shakespeare.py

writes experiments/results/posttrain_gpt_shakespeare.json (after every run, so a stopped
run keeps what it finished) and .png; ``--plot-only`` redraws the PNG from the JSON, and
``--summary-only`` recomputes the JSON's summary (mean and sample std, ``ddof=1``, over
the calibration seeds) from the per-seed runs it holds, then redraws the PNG: no training
and no pruning.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from sparsejax.harness.cli import main as sparsejax_main
from sparsejax.harness.provenance import provenance
from sparsejax.harness.prune_run import restore_finished_run
from sparsejax.harness.training.loop import evaluate, make_eval_step
from sparsejax.posttrain.sequential import prune_sequential

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
OUT = RESULTS / "posttrain_gpt_shakespeare.json"
RUN = ROOT / "runs" / "posttrain_gpt_dense"
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare"
TRAIN = ["--method", "dense", "--model", "gpt", "--dataset", "tinyshakespeare",
         "--steps", "2000", "--batch-size", "64", "--optimizer", "adam", "--lr", "1e-3",
         "--recipe", "none", "--eval-every", "500", "--seed", "0"]
SETTINGS = [("unstructured", 0.5), ("2:4", None), ("4:8", None), ("unstructured", 0.6),
            ("unstructured", 0.7), ("unstructured", 0.8)]
METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATION_SIZE = 128
CALIBRATION_SEEDS = (0, 1, 2)


def label(pattern: str, sparsity: float | None) -> str:
    return pattern if sparsity is None else f"{round(sparsity * 100)}% unstructured"


def trained_run() -> Path:
    if not (RUN / "result.json").exists():
        code = sparsejax_main(["train", *TRAIN, "--data-dir", str(DATA), "--out", str(RUN),
                               "--no-progress", "--no-tensorboard"])
        if code != 0:
            raise SystemExit(f"training the dense GPT failed ({code})")
    return RUN


def save(payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, OUT)


def summarise(runs: list[dict]) -> dict:
    summary: dict = {}
    for pattern, sparsity in SETTINGS:
        name = label(pattern, sparsity)
        for method in METHODS:
            chosen = [r for r in runs if r["setting"] == name and r["method"] == method]
            if not chosen:
                continue
            loss = np.array([r["validation_loss"] for r in chosen])
            # the sample std over the calibration seeds (none for magnitude's one run)
            std = float(loss.std(ddof=1)) if len(chosen) > 1 else None
            errors = np.array([[layer["reconstruction_error"] for layer in r["layers"]]
                               for r in chosen])
            summary.setdefault(name, {})[method] = {
                "validation_loss_mean": float(loss.mean()),
                "validation_loss_std": std, "seeds": len(chosen),
                "reconstruction_error_mean": dict(zip(
                    [layer["name"] for layer in chosen[0]["layers"]],
                    errors.mean(axis=0).tolist(), strict=True)),
            }
    return summary


def main() -> None:
    if sys.argv[1:] == ["--plot-only"]:
        plot(json.loads(OUT.read_text()))
        return
    if sys.argv[1:] == ["--summary-only"]:
        payload = json.loads(OUT.read_text())
        payload["summary"] = summarise(payload["runs"])
        save(payload)
        plot(payload)
        return
    t0 = time.time()
    finished = restore_finished_run(trained_run())
    run = finished.run
    params = jax.jit(run.method.effective_params)(finished.state)
    model_state = finished.state.model_state
    eval_step = jax.jit(make_eval_step(run.model))

    def validation(p: dict) -> dict:
        return evaluate(eval_step, (p, model_state), run.dataset)

    dense = validation(params)
    print(f"dense validation loss {dense['loss']:.4f} nats/char (trained "
          f"{finished.result['wall_seconds']:.0f} s)", flush=True)
    windows = run.dataset.train_images
    payload = {
        "description": __doc__.strip().splitlines()[0],
        "model": "gpt", "dataset": "tinyshakespeare", "train_args": TRAIN,
        "run": str(RUN.relative_to(ROOT)), "train_seconds": finished.result["wall_seconds"],
        "dense_validation_loss": dense["loss"], "dense_validation_accuracy": dense["accuracy"],
        "calibration_windows": CALIBRATION_SIZE, "context": int(windows.shape[1]),
        "calibration_seeds": list(CALIBRATION_SEEDS),
        "sparsegpt": {"blocksize": 128, "percdamp": 0.01}, "runs": [],
        "provenance": provenance(),
    }
    for pattern, sparsity in SETTINGS:
        for method in METHODS:
            for seed in CALIBRATION_SEEDS[:1] if method == "magnitude" else CALIBRATION_SEEDS:
                chosen = np.random.default_rng(seed).choice(len(windows), CALIBRATION_SIZE,
                                                            replace=False)
                start = time.time()
                pruned, report = prune_sequential(
                    run.model, params, windows[np.sort(chosen)], method, pattern, sparsity,
                    model_state=model_state, apply_kwargs={"train": False})
                seconds = time.time() - start
                after = validation(pruned)
                payload["runs"].append({
                    "method": method, "pattern": pattern,
                    "sparsity": 0.5 if sparsity is None else sparsity,
                    "setting": label(pattern, sparsity),
                    "calibration_seed": None if method == "magnitude" else seed,
                    "validation_loss": after["loss"], "validation_accuracy": after["accuracy"],
                    "layers": [r._asdict() for r in report], "prune_seconds": seconds,
                })
                print(f"{label(pattern, sparsity):18s} {method:9s} seed {seed}: "
                      f"val loss {after['loss']:.4f}  ({seconds:.1f} s prune, "
                      f"{time.time() - start:.1f} s with evaluation)", flush=True)
                payload["summary"] = summarise(payload["runs"])
                payload["total_seconds"] = time.time() - t0
                save(payload)
    plot(payload)
    print(f"wrote {OUT} ({payload['total_seconds']:.0f} s)")


def plot(payload: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [label(p, s) for p, s in SETTINGS if label(p, s) in payload["summary"]]
    dense = payload["dense_validation_loss"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.26
    for i, method in enumerate(METHODS):
        xs = np.arange(len(settings)) + (i - 1) * width
        rows = [payload["summary"][s].get(method) for s in settings]
        ax.bar(xs, [r["validation_loss_mean"] if r else np.nan for r in rows], width,
               yerr=[(r["validation_loss_std"] or 0) if r else 0 for r in rows], label=method,
               capsize=2)
    ax.axhline(dense, color="black", lw=1, ls="--", label=f"dense {dense:.3f}")
    ax.axhline(np.log(65), color="gray", lw=1, ls=":", label="uniform over 65 characters")
    ax.set_ylim(bottom=1.4)
    ax.set_xticks(np.arange(len(settings)), settings, rotation=10, fontsize=8)
    ax.set_ylabel("validation loss (nats/char)")
    ax.legend(fontsize=8)
    ax.set_title("GPT 4x128 / tinyshakespeare: one-shot pruning of every Dense kernel, no "
                 f"retraining\n({payload['calibration_windows']} calibration windows, "
                 f"mean and sample std over {len(payload['calibration_seeds'])} calibration "
                 "seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
