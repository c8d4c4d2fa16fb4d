"""``sparsejax prune``: one-shot post-training pruning of a finished ``sparsejax train`` run.

The run's newest good checkpoint is restored, its effective weights are pruned layer
after layer from calibration examples of its own training set
(:func:`sparsejax.posttrain.sequential.prune_sequential`: magnitude, Wanda or SparseGPT;
unstructured or N:M, and for magnitude and Wanda also ``block:B`` or ``channel``), and
the pruned model is evaluated on the test set.
``OUT/result.json`` holds the test accuracy and loss before and after (for a language
model such as ``gpt`` on ``tinyshakespeare`` the test split is the held-out validation
text, and ``validation_loss_nats_per_char`` repeats its loss), the measured sparsity,
each layer's density and reconstruction error, the settings and the provenance. Every
model whose prunable kernels are all ``nn.Dense`` kernels can be pruned (``lenet300``,
``mlp``, ``gpt``); models with prunable Conv kernels are refused (not supported yet).

    sparsejax prune --method sparsegpt --pattern 2:4 runs/dense_lenet300_mnist_seed0
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sparsejax.core.validation import check_int, check_writable_folder
from sparsejax.harness.provenance import provenance
from sparsejax.harness.training.run_folder import restore_finished_run
from sparsejax.io.files import check_run_result, read_json, write_json
from sparsejax.posttrain.pruners import (
    POSTTRAIN_METHODS,
    check_posttrain_pattern,
    posttrain_density,
)

__all__ = ["prune_run", "restore_run", "add_commands"]

CALIBRATION_BATCH = 256
"""Calibration examples run through the model at a time (their Hessians are summed)."""


def restore_run(run_dir: str | Path, data_dir: str | Path | None = None) -> Any:
    """``restore_finished_run(run_dir, data_dir)`` for ``sparsejax prune`` and
    ``export-ticket``: a broken ``result.json`` is named and, when the run's data is no
    longer where it trained, the advice names ``--data-dir``."""
    from sparsejax.harness.data import DatasetNotAvailableError

    run_dir = Path(run_dir)
    check_run_result(run_dir)  # a broken result.json is named (not a bare JSON error)
    try:
        return restore_finished_run(run_dir, data_dir)
    except DatasetNotAvailableError as error:
        config = read_json(run_dir / "result.json")["config"]
        folder = data_dir if data_dir is not None else config.get("data_dir")
        place = f"in {folder}" if folder else "in the default TFDS data_dir"
        problem = str(error).split(" To provide it,")[0].rstrip(".")
        raise DatasetNotAvailableError(
            f"{run_dir} was trained on dataset {config.get('dataset')!r}, which is not "
            f"{place} ({problem}); pass --data-dir with the folder that holds it now (the "
            "data folder does not change the run)") from None


def prune_run(run_dir: str | Path, method: str, pattern: str = "unstructured",
              sparsity: float | None = None, *, calibration_examples: int = 1024,
              seed: int = 0, out: str | Path | None = None,
              overwrite: bool = False, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Prune the finished run in ``run_dir`` one-shot and write ``OUT/result.json``.

    ``OUT`` defaults to ``RUN_DIR/prune/<method>_<pattern>[_s<sparsity>]_seed<seed>``;
    calibration takes ``calibration_examples`` training examples drawn with ``seed``; the
    run's data comes from ``data_dir`` when given, else from where it trained. Returns the
    result.
    """
    from sparsejax.harness.training.loop import evaluate, make_eval_step, measured_sparsity
    from sparsejax.posttrain.sequential import prune_sequential

    started = time.time()
    posttrain_density(check_posttrain_pattern(method, pattern), sparsity, "--sparsity")
    check_int(calibration_examples, "--calibration-examples", minimum=1)
    check_int(seed, "--seed", minimum=0, maximum=2**32 - 1)
    run_dir = Path(run_dir)
    tag = f"{method}_{pattern.replace(':', 'of')}"
    tag += "" if sparsity is None else f"_s{sparsity:g}"
    out = Path(out) if out is not None else run_dir / "prune" / f"{tag}_seed{seed}"
    check_writable_folder(out, "--out")
    if (out / "result.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'result.json'} exists; pass --overwrite to replace it "
                              "or choose another --out")
    finished = restore_run(run_dir, data_dir)
    config, run = finished.config, finished.run
    params = jax.jit(run.method.effective_params)(finished.state)
    model_state = finished.state.model_state
    images = run.dataset.train_images
    count = min(calibration_examples, len(images))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images))[:count])
    try:
        pruned, layers = prune_sequential(
            run.model, params, images[chosen], method, pattern, sparsity,
            model_state=model_state, batch_size=CALIBRATION_BATCH,
            apply_kwargs={"train": False})
    except ValueError as error:
        raise ValueError(f"cannot prune the {config.model!r} of {run_dir}: {error}") from None
    eval_step = jax.jit(make_eval_step(run.model))
    before = evaluate(eval_step, (params, model_state), run.dataset)
    after = evaluate(eval_step, (pruned, model_state), run.dataset)
    result = {
        "command": "prune",
        "run": str(run_dir),
        "method": method,
        "model": config.model,
        "dataset": config.dataset,
        "pattern": pattern,
        "target_sparsity": sparsity,
        "sparsity": measured_sparsity(pruned),
        "test_accuracy": after["accuracy"],
        "test_loss": after["loss"],
        "before": {"test_accuracy": before["accuracy"], "test_loss": before["loss"],
                   "sparsity": measured_sparsity(params), "method": config.method,
                   "step": finished.step},
        "layers": [layer._asdict() for layer in layers],
        "calibration_examples": count,
        "calibration_batch": CALIBRATION_BATCH,
        "seed": seed,
        "wall_seconds": time.time() - started,
        "provenance": provenance(),
    }
    if run.dataset.vocabulary is not None:  # a language model: the test split is validation
        result["validation_loss_nats_per_char"] = after["loss"]
        result["before"]["validation_loss_nats_per_char"] = before["loss"]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "result.json", result)  # atomic: never a 0-byte result.json
    return result


def _prune_command(args: argparse.Namespace) -> int:
    result = prune_run(args.run_dir, args.method, args.pattern, args.sparsity,
                       calibration_examples=args.calibration_examples, seed=args.seed,
                       out=args.out, overwrite=args.overwrite, data_dir=args.data_dir)
    before = result["before"]
    if "validation_loss_nats_per_char" in result:
        change = (f"validation loss {before['validation_loss_nats_per_char']:.4f} -> "
                  f"{result['validation_loss_nats_per_char']:.4f} nats/char")
    else:
        change = (f"test accuracy {100 * before['test_accuracy']:.2f}% -> "
                  f"{100 * result['test_accuracy']:.2f}%")
    print(f"{result['method']} {result['pattern']}: {change} at sparsity "
          f"{100 * result['sparsity']:.2f}% ({result['wall_seconds']:.1f} s)")
    return 0


def add_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``prune`` to the ``sparsejax`` parser."""
    prune = commands.add_parser(
        "prune", help="one-shot post-training pruning of a finished run (Dense layers)")
    prune.add_argument("run_dir", help="a finished run folder (result.json, checkpoints/)")
    prune.add_argument("--method", required=True, choices=POSTTRAIN_METHODS,
                       help="magnitude, wanda or sparsegpt")
    prune.add_argument("--pattern", default="unstructured",
                       help="unstructured (default); N:M, e.g. 2:4 (fixes the sparsity); "
                            "block:B or channel (magnitude and wanda only)")
    prune.add_argument("--sparsity", type=float, default=None,
                       help="fraction of each kernel pruned (not with an N:M pattern)")
    prune.add_argument("--calibration-examples", type=int, default=1024,
                       help="training examples the layers are calibrated on")
    prune.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    prune.add_argument("--data-dir", default=None,
                       help="the run's data, if it moved since training (default: where the "
                            "run trained)")
    prune.add_argument("--out", default=None,
                       help="output folder (default: RUN_DIR/prune/<settings>)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a result already in --out")
    return {"prune": _prune_command}
