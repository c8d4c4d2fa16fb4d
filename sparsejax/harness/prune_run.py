"""``sparsejax prune``: one-shot post-training pruning of a finished ``sparsejax train`` run.

The run's newest good checkpoint is restored, its effective weights are pruned from
calibration examples of its own training set (magnitude, Wanda or SparseGPT;
unstructured or N:M, and for magnitude and Wanda also ``block:B`` or ``channel``), and
the pruned model is evaluated on the test set.

Two drivers (``--driver``). ``blocks``, the default for the transformers (``gpt``: its
``block1..blockN``; ``llama``: its ``layers/0..``), is
:func:`sparsejax.posttrain.blocks.prune_blocks`: the calibration set runs through the
model once and the blocks are pruned one after the other on cached activations, every
layer of a block on the block's inputs, as the Wanda and SparseGPT reference code prunes
a transformer; the head and the embeddings stay dense (the references' default).
``sequential``, the default for the other models (``lenet300``, ``mlp``) and the only
driver of linen models without blocks, is
:func:`sparsejax.posttrain.sequential.prune_sequential`: every Dense layer in call order
on the inputs the already pruned layers give it, the forward re-run from the input for
each layer (time grows with depth squared; linen models only); it prunes the head.
``--prune-head`` / ``--keep-head-dense`` override the head's default either way (with
``blocks`` the head is pruned last, on the pruned blocks' features).
``OUT/result.json`` holds the test accuracy and loss before and after (for a language
model such as ``gpt`` on ``tinyshakespeare`` the test split is the held-out validation
text, and ``validation_loss_nats_per_char`` repeats its loss), the measured sparsity,
each layer's density and reconstruction error, the ``driver`` and whether the head was
pruned (``head_pruned``), the settings and the provenance. Every model whose prunable
kernels are all Dense/Linear kernels can be pruned (``lenet300``, ``mlp``, ``gpt``,
``llama``); models with prunable Conv kernels are refused (not supported yet).

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
    hessian_reconstruction_error,
    input_hessian,
    posttrain_density,
    prune_layer_hessian,
)
from sparsejax.posttrain.sequential import LayerReport

__all__ = ["prune_run", "restore_run", "add_commands", "model_blocks", "DRIVERS"]

CALIBRATION_BATCH = 256
"""Calibration examples run through the model at a time (their Hessians are summed)."""

DRIVERS = ("blocks", "sequential")
"""``blocks``: :func:`~sparsejax.posttrain.blocks.prune_blocks` (block by block on cached
activations, head dense by default); ``sequential``:
:func:`~sparsejax.posttrain.sequential.prune_sequential` (layer after layer over the
whole model, head pruned by default; linen models only)."""

HEAD = "head"
"""The classifier every model of the zoo names ``head``."""


def model_blocks(model: Any) -> list[str] | None:
    """The transformer blocks of a zoo model as :func:`prune_blocks` names them
    (``gpt``: ``block1..blockN``; ``llama``: ``layers/0..``), or ``None`` for a model
    without blocks.

    >>> from sparsejax.harness.models import get_model
    >>> model_blocks(get_model("gpt", 5, n_layer=2)), model_blocks(get_model("mlp", 5))
    (['block1', 'block2'], None)
    """
    from sparsejax.harness.models import GPT, NNXModel

    if isinstance(model, GPT):
        return [f"block{i}" for i in range(1, model.n_layer + 1)]
    if isinstance(model, NNXModel) and hasattr(model.cls, "block_paths"):
        from flax import nnx

        return nnx.eval_shape(lambda: model.module(0)).block_paths()  # nothing computed
    return None


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


BLOCK_CALIBRATION = 128
"""Calibration sequences of a model with blocks (gpt, llama) by default: the number the
Wanda and SparseGPT reference code calibrates on (``--nsamples 128``)."""
LAYER_CALIBRATION = 1024
"""Calibration examples of the other models (MLPs on images) by default."""


def prune_run(run_dir: str | Path, method: str, pattern: str = "unstructured",
              sparsity: float | None = None, *, calibration_examples: int | None = None,
              seed: int = 0, out: str | Path | None = None,
              overwrite: bool = False, data_dir: str | Path | None = None,
              driver: str | None = None, prune_head: bool | None = None) -> dict[str, Any]:
    """Prune the finished run in ``run_dir`` one-shot and write ``OUT/result.json``.

    ``OUT`` defaults to ``RUN_DIR/prune/<method>_<pattern>[_s<sparsity>][_<driver>]
    [_head|_densehead]_seed<seed>`` (driver and head as given);
    calibration takes ``calibration_examples`` training examples drawn with ``seed``
    (``None``: :data:`BLOCK_CALIBRATION` sequences for a model with blocks, the
    references' 128, else :data:`LAYER_CALIBRATION` examples); the
    run's data comes from ``data_dir`` when given, else from where it trained. ``driver``
    (:data:`DRIVERS`; ``None``: ``blocks`` for a model with blocks, else ``sequential``)
    and ``prune_head`` (``None``: the driver's default, dense with ``blocks``, pruned with
    ``sequential``) choose how. Returns the result.
    """
    started = time.time()
    posttrain_density(check_posttrain_pattern(method, pattern), sparsity, "--sparsity")
    if driver is not None and driver not in DRIVERS:
        raise ValueError(f"--driver must be one of {', '.join(DRIVERS)}, got {driver!r}")
    if calibration_examples is not None:
        check_int(calibration_examples, "--calibration-examples", minimum=1)
    check_int(seed, "--seed", minimum=0, maximum=2**32 - 1)
    run_dir = Path(run_dir)
    tag = f"{method}_{pattern.replace(':', 'of')}"
    tag += "" if sparsity is None else f"_s{sparsity:g}"
    tag += "" if driver is None else f"_{driver}"
    tag += "" if prune_head is None else ("_head" if prune_head else "_densehead")
    out = Path(out) if out is not None else run_dir / "prune" / f"{tag}_seed{seed}"
    check_writable_folder(out, "--out")
    if (out / "result.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'result.json'} exists; pass --overwrite to replace it "
                              "or choose another --out")
    finished = restore_run(run_dir, data_dir)
    config, run = finished.config, finished.run
    blocks = model_blocks(run.model)
    driver = driver or ("blocks" if blocks else "sequential")
    if driver == "blocks" and not blocks:
        raise ValueError(f"--driver blocks: model {config.model!r} has no transformer blocks; "
                         "use --driver sequential")
    head = (driver == "sequential") if prune_head is None else prune_head
    if calibration_examples is None:
        calibration_examples = BLOCK_CALIBRATION if blocks else LAYER_CALIBRATION
    params = jax.jit(run.method.effective_params)(finished.state)
    model_state = finished.state.model_state
    images = run.dataset.train_images
    count = min(calibration_examples, len(images))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images))[:count])
    try:
        pruned, layers = _prune(run.model, params, model_state, images[chosen], method,
                                pattern, sparsity, driver, blocks, head)
    except ValueError as error:
        raise ValueError(f"cannot prune the {config.model!r} of {run_dir}: {error}") from None
    return _finish(run_dir, out, finished, params, pruned, layers, {
        "method": method, "pattern": pattern, "target_sparsity": sparsity,
        "calibration_examples": count, "seed": seed, "driver": driver,
        "head_pruned": head}, started)


def _prune(model: Any, params: Any, model_state: Any, inputs: np.ndarray, method: str,
           pattern: str, sparsity: float | None, driver: str, blocks: list[str] | None,
           head: bool) -> tuple[Any, list[LayerReport]]:
    """The pruned params and the layer reports of ``driver`` (``head``: the head too)."""
    from sparsejax.core.masks import default_prunable
    from sparsejax.harness.models import NNXModel
    from sparsejax.posttrain.blocks import prune_blocks
    from sparsejax.posttrain.sequential import prune_sequential

    nnx_model = isinstance(model, NNXModel)
    if driver == "sequential":
        if nnx_model:
            raise ValueError("the sequential driver takes linen models only; use --driver "
                             "blocks (the default)")
        return prune_sequential(
            model, params, inputs, method, pattern, sparsity, model_state=model_state,
            batch_size=CALIBRATION_BATCH, apply_kwargs={"train": False},
            prunable=default_prunable if head else _except_head)
    if nnx_model:
        module, report = prune_blocks(model.merge(params), None, inputs, method, pattern,
                                      sparsity, blocks=blocks, batch_size=CALIBRATION_BATCH)
        pruned = model.params_of(module)
    else:
        pruned, report = prune_blocks(model, params, inputs, method, pattern, sparsity,
                                      blocks=blocks, model_state=model_state,
                                      batch_size=CALIBRATION_BATCH,
                                      apply_kwargs={"train": False})
    if head:
        pruned, last = _prune_head(model, pruned, model_state, inputs, method, pattern,
                                   sparsity)
        report = [*report, last]
    return pruned, report


def _except_head(name: str, leaf: Any) -> bool:
    from sparsejax.core.masks import default_prunable

    return default_prunable(name, leaf) and not name.startswith(HEAD + "/")


def _prune_head(model: Any, params: Any, model_state: Any, inputs: np.ndarray, method: str,
                pattern: str, sparsity: float | None) -> tuple[Any, LayerReport]:
    """``params`` with the head pruned on the features the (already pruned) model gives
    it: ``H = X^T X`` summed over the calibration batches, as the drivers prune a layer."""
    from sparsejax.harness.models import NNXModel
    from sparsejax.posttrain.capture import capture_dense_inputs, capture_linear_inputs

    @jax.jit
    def hessian(params: Any, batch: jax.Array) -> jax.Array:
        if isinstance(model, NNXModel):
            x = capture_linear_inputs(model.merge(params), batch, layers=[(HEAD,)])
        else:
            x = capture_dense_inputs(model, {"params": params, **model_state}, batch,
                                     layers=[(HEAD,)], train=False)
        return input_hessian(x[(HEAD,)])

    h = sum(hessian(params, inputs[i:i + CALIBRATION_BATCH])
            for i in range(0, len(inputs), CALIBRATION_BATCH))
    kernel = params[HEAD]["kernel"]
    try:
        result = prune_layer_hessian(method, kernel, h, pattern, sparsity)
    except ValueError as error:
        raise ValueError(f"{HEAD}/kernel: {error}") from None
    error = hessian_reconstruction_error(kernel, result.kernel, h)
    pruned = {**params, HEAD: {**params[HEAD], "kernel": result.kernel}}
    return pruned, LayerReport(HEAD, float(np.mean(result.mask)), float(error))


def _finish(run_dir: Path, out: Path, finished: Any, params: Any, pruned: Any,
            layers: list[LayerReport], settings: dict[str, Any],
            started: float) -> dict[str, Any]:
    """Evaluate before and after, write ``OUT/result.json`` and return the result."""
    from sparsejax.harness.training.loop import evaluate, make_eval_step, measured_sparsity

    config, run, model_state = finished.config, finished.run, finished.state.model_state
    eval_step = jax.jit(make_eval_step(run.model))
    before = evaluate(eval_step, (params, model_state), run.dataset)
    after = evaluate(eval_step, (pruned, model_state), run.dataset)
    result = {
        "command": "prune",
        "run": str(run_dir),
        "method": settings["method"],
        "model": config.model,
        "dataset": config.dataset,
        "pattern": settings["pattern"],
        "target_sparsity": settings["target_sparsity"],
        "sparsity": measured_sparsity(pruned),
        "test_accuracy": after["accuracy"],
        "test_loss": after["loss"],
        "before": {"test_accuracy": before["accuracy"], "test_loss": before["loss"],
                   "sparsity": measured_sparsity(params), "method": config.method,
                   "step": finished.step},
        "layers": [layer._asdict() for layer in layers],
        "driver": settings["driver"],
        "head_pruned": settings["head_pruned"],
        "calibration_examples": settings["calibration_examples"],
        "calibration_batch": CALIBRATION_BATCH,
        "seed": settings["seed"],
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
                       out=args.out, overwrite=args.overwrite, data_dir=args.data_dir,
                       driver=args.driver, prune_head=args.prune_head)
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
    prune.add_argument("--calibration-examples", type=int, default=None,
                       help="training examples the layers are calibrated on (default: 128 "
                            "sequences for gpt and llama, the Wanda and SparseGPT "
                            "references' count; 1024 examples for the other models)")
    prune.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    prune.add_argument("--driver", choices=DRIVERS, default=None,
                       help="blocks: block by block on cached activations (default for gpt "
                            "and llama); sequential: layer after layer over the whole model "
                            "(default for models without blocks; linen models only)")
    head = prune.add_mutually_exclusive_group()
    head.add_argument("--prune-head", dest="prune_head", action="store_true", default=None,
                      help="prune the output head too (default with --driver sequential)")
    head.add_argument("--keep-head-dense", dest="prune_head", action="store_false",
                      help="keep the output head dense (default with --driver blocks, as the "
                           "reference code)")
    prune.add_argument("--data-dir", default=None,
                       help="the run's data, if it moved since training (default: where the "
                            "run trained)")
    prune.add_argument("--out", default=None,
                       help="output folder (default: RUN_DIR/prune/<settings>)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a result already in --out")
    return {"prune": _prune_command}
