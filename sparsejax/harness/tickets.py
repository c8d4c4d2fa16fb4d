"""Strong lottery tickets of finished runs: ``sparsejax export-ticket`` and ``evaluate-ticket``.

A finished run of a frozen-weight method (``edge_popup``, ``biprop``) is fully described
by the recipe that drew the weights (the run's config and seed) and one bit per weight.
``sparsejax export-ticket RUN_DIR`` reads a finished run folder (``result.json`` and the
newest checkpoint) and writes a ticket file (the format: :mod:`sparsejax.io.tickets`);
:func:`load_ticket` regenerates the frozen weights from the seed
(``init_key, method_key = split(PRNGKey(seed))``; the model's params are initialised with
``init_key`` and the method draws its frozen weights in ``method.init(params,
method_key)``), applies the masks, and gives predictions bitwise equal to the trained
run's. Its header adds the run's full config, the number of classes and the input shape,
the run's length (for methods that schedule by step) and the model-state leaves.

Exporting refuses a run whose weights are not the ones its seed draws (a method that
trained them), or whose effective weights are not a function of weights and masks alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import path_str
from sparsejax.io.tickets import (
    TICKET_FORMAT,
    TICKET_VERSION,
    check_contents,
    pack_masks,
    read_archive,
    tree_digest,
    unpack_masks,
    write_archive,
)

__all__ = [
    "Ticket",
    "add_commands",
    "evaluate_ticket",
    "export_ticket",
    "load_ticket",
]

PyTree = Any


class Ticket(NamedTuple):
    """A loaded ticket.

    Attributes:
      model: the Flax model of the run.
      params: the effective params (frozen weights under the hard masks).
      model_state: non-trainable collections evaluation needs (``{}`` for LeNet).
      masks: the bool masks, with the params' structure.
      config: the run's :class:`~sparsejax.harness.training.loop.TrainConfig`.
      header: the file's JSON header.
    """

    model: Any
    params: PyTree
    model_state: PyTree
    masks: PyTree
    config: Any
    header: dict[str, Any]


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _float32_bytes(tree: PyTree) -> int:
    return int(sum(4 * np.size(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


class _Regenerated(NamedTuple):
    model: Any
    method: Any
    state: Any  # the method's initial state: the frozen weights drawn from the seed


def _regenerate(config: Any, num_classes: int, input_shape: tuple[int, ...],
                total_steps: int, batches_per_epoch: int) -> _Regenerated:
    """Rebuild model, method and initial state exactly as the training harness does
    (:func:`sparsejax.harness.training.setup.prepare`), without loading the data."""
    from sparsejax.harness.models import get_model, init_model
    from sparsejax.harness.training.loop import build_method
    from sparsejax.harness.training.optim import make_optimizer

    model = get_model(config.model, num_classes, **config.model_options)
    init_key, method_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params, model_state = init_model(model, init_key, (1, *input_shape))
    optimizer = make_optimizer(config.optimizer, config.lr, total_steps=total_steps,
                               momentum=config.momentum, weight_decay=config.weight_decay,
                               lr_schedule=config.lr_schedule)
    method = build_method(config, optimizer, total_steps=total_steps,
                          batches_per_epoch=batches_per_epoch)

    @jax.jit
    def init(params: Any, key: jax.Array, model_state: Any):
        return method.init(params, key, model_state, None)

    return _Regenerated(model, method, init(params, method_key, model_state))


def _effective(method: Any, state: Any) -> PyTree:
    return jax.device_get(jax.jit(method.effective_params)(state))


def export_ticket(run_dir: str | os.PathLike[str],
                  output: str | os.PathLike[str] | None = None, *,
                  overwrite: bool = False,
                  data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write the ticket of a finished run folder; returns a summary (path, sizes). The
    run's data comes from ``data_dir`` when given (it moved), else from where it trained.

    ``run_dir`` holds ``result.json`` (the full config) and ``checkpoints/`` (the newest
    good checkpoint is used). ``output`` defaults to ``RUN_DIR/ticket.npz``; a file
    already there is refused (``FileExistsError``) unless ``overwrite``. Raises
    ``ValueError`` when the run's weights are not the frozen ones its seed draws, or when
    ``output`` cannot be written (a folder, or under a regular file).
    """
    from sparsejax.core.validation import check_writable_file
    from sparsejax.harness.prune_run import restore_run

    run_dir = Path(run_dir)
    output = Path(output) if output is not None else run_dir / "ticket.npz"
    check_writable_file(output, "--output")  # before the (slow) restore
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it, or choose "
                              "another --output")
    finished = restore_run(run_dir, data_dir)  # names a broken result.json
    config, run, step, state = finished.config, finished.run, finished.step, finished.state
    result = finished.result
    input_shape = tuple(int(d) for d in run.dataset.input_shape)
    regen = _regenerate(config, run.dataset.num_classes, input_shape, run.total_steps,
                        run.batches_per_epoch)
    frozen_digest = tree_digest(regen.state.params)
    if tree_digest(state.params) != frozen_digest:
        raise ValueError(
            f"the weights of method {config.method!r} in {run_dir} are not the frozen ones "
            "its seed draws (the method trained them?); a ticket is a seed plus a mask "
            "and needs a frozen-weight method such as edge_popup or biprop")
    effective = _effective(run.method, state)
    masks = jax.device_get(jax.jit(run.method.hard_masks)(state))
    rebuilt = jax.device_get(jax.jit(regen.method.params_with_masks)(
        regen.state.replace(model_state=state.model_state), masks))
    effective_digest = tree_digest(effective)
    if tree_digest(rebuilt) != effective_digest:
        raise ValueError(
            f"the effective weights of method {config.method!r} depend on more than the "
            "frozen weights and the masks; it cannot be exported as a ticket")

    rows, packed = pack_masks(masks)
    state_flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.model_state))[0]
    state_rows = [{"path": path_str(p), "shape": list(np.shape(v)), "dtype": str(np.asarray(
        v).dtype)} for p, v in state_flat]
    header = {
        "format": TICKET_FORMAT,
        "version": TICKET_VERSION,
        "config": dataclasses.asdict(config),
        "num_classes": int(run.dataset.num_classes),
        "input_shape": list(input_shape),
        "total_steps": int(run.total_steps),
        "batches_per_epoch": int(run.batches_per_epoch),
        "checkpoint_step": int(step),
        "weight_recipe": {
            "method": config.method,
            "seed": config.seed,
            "keys": "init_key, method_key = jax.random.split(jax.random.PRNGKey(seed))",
            "model_params": "init_model(model, init_key, (1, *input_shape))",
            "frozen_weights": "method.init(params, method_key, model_state).params "
                              "(method options in config.method_options)",
        },
        "masks": rows,
        "model_state": state_rows,
        "frozen_params_sha256": frozen_digest,
        "effective_params_sha256": effective_digest,
        "test_accuracy": result.get("test_accuracy"),
        "jax_version": jax.__version__,
    }
    write_archive(output, header, packed,
                   {f"state_{i:05d}": np.asarray(v) for i, (_, v) in enumerate(state_flat)})
    total = sum(int(np.prod(r["shape"])) for r in rows)
    return {
        "ticket": str(output),
        "ticket_bytes": output.stat().st_size,
        "packed_mask_bytes": int(sum(b.nbytes for b in packed)),
        "model_state_bytes": int(sum(np.asarray(v).nbytes for _, v in state_flat)),
        "weights": total,
        "kept": int(sum(r["kept"] for r in rows)),
        "float32_params_bytes": _float32_bytes(state.params),
        "checkpoint_bytes": _directory_bytes(finished.checkpoint_dir),
        "checkpoint_step": int(step),
    }


_TICKET_KEYS = ("config", "num_classes", "input_shape", "total_steps", "batches_per_epoch",
                "frozen_params_sha256", "effective_params_sha256", "masks", "model_state")


def load_ticket(path: str | os.PathLike[str]) -> Ticket:
    """Regenerate a ticket's frozen weights from its seed and apply its masks.

    Raises ``ValueError`` when the regenerated weights or the effective weights differ
    from the exported run's (their sha256 digests are in the header), e.g. under a JAX
    version whose random numbers differ.
    """
    from sparsejax.harness.training.loop import TrainConfig

    path = Path(path)
    header, arrays = read_archive(path)
    if "config" not in header:
        raise ValueError(f"{path} was exported from a model ({header.get('source')}); load "
                         "it with that module's load_ticket")
    check_contents(path, header, arrays, _TICKET_KEYS)
    config = TrainConfig.from_saved(header["config"])
    regen = _regenerate(config, header["num_classes"], tuple(header["input_shape"]),
                        header["total_steps"], header["batches_per_epoch"])
    if tree_digest(regen.state.params) != header["frozen_params_sha256"]:
        raise ValueError(
            f"the weights regenerated from the seed of {path} differ from the exported run's "
            f"(exported with jax {header.get('jax_version')}, this is jax {jax.__version__})")
    packed = [arrays[f"mask_{i:05d}"] for i in range(len(header["masks"]))]
    masks = unpack_masks(header["masks"], packed, jax.device_get(regen.state.params))
    state_template = jax.tree_util.tree_flatten_with_path(regen.state.model_state)
    rows = header["model_state"]
    if [path_str(p) for p, _ in state_template[0]] != [r["path"] for r in rows]:
        raise ValueError(f"the model state in {path} does not match the model's")
    model_state = jax.tree_util.tree_unflatten(
        state_template[1], [jnp.asarray(arrays[f"state_{i:05d}"]) for i in range(len(rows))])
    masks = jax.tree_util.tree_map(jnp.asarray, masks)
    effective = jax.jit(regen.method.params_with_masks)(
        regen.state.replace(model_state=model_state), masks)
    if tree_digest(effective) != header["effective_params_sha256"]:
        raise ValueError(f"the effective weights rebuilt from {path} differ from the "
                         "exported run's")
    return Ticket(regen.model, effective, model_state, masks, config, header)


def evaluate_ticket(ticket: Ticket, data_dir: str | None = None,
                    batch_size: int = 1000) -> dict[str, float]:
    """Test accuracy and loss of a loaded ticket on its run's dataset."""
    from sparsejax.harness.training.evaluation import evaluate, make_eval_step
    from sparsejax.harness.training.setup import load_run_dataset

    dataset = load_run_dataset(ticket.config, data_dir)
    eval_step = jax.jit(make_eval_step(ticket.model))
    return evaluate(eval_step, (ticket.params, ticket.model_state), dataset, batch_size)


def _export_command(args: argparse.Namespace) -> int:
    summary = export_ticket(args.run_dir, args.output, overwrite=args.overwrite,
                            data_dir=args.data_dir)
    print(f"wrote {summary['ticket']}: {summary['ticket_bytes']} bytes "
          f"({summary['packed_mask_bytes']} bytes of packed masks for {summary['weights']} "
          f"weights, {summary['kept']} kept; {summary['model_state_bytes']} bytes of model "
          f"state) against {summary['float32_params_bytes']} bytes of float32 params and "
          f"{summary['checkpoint_bytes']} bytes of checkpoint")
    return 0


def _evaluate_command(args: argparse.Namespace) -> int:
    ticket = load_ticket(args.ticket)
    metrics = evaluate_ticket(ticket, args.data_dir)
    print(f"{args.ticket}: test accuracy {100 * metrics['accuracy']:.2f}% "
          f"(the exported run: {100 * (ticket.header.get('test_accuracy') or float('nan')):.2f}%)")
    return 0


def add_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``export-ticket`` and ``evaluate-ticket`` to the ``sparsejax`` parser."""
    export = commands.add_parser(
        "export-ticket", help="write a strong ticket (weight seed + bit-packed masks) of a run")
    export.add_argument("run_dir", help="a finished run folder (result.json, checkpoints/)")
    export.add_argument("--output", "-o", default=None,
                        help="ticket file (default: RUN_DIR/ticket.npz)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a ticket file already at --output instead of refusing")
    export.add_argument("--data-dir", default=None,
                        help="the run's data, if it moved since training (default: where the "
                             "run trained)")
    evaluate = commands.add_parser(
        "evaluate-ticket", help="regenerate a ticket's weights and measure its test accuracy")
    evaluate.add_argument("ticket", help="a ticket file written by export-ticket")
    evaluate.add_argument("--data-dir", default=None,
                          help="dataset folder (default: the run's)")
    return {"export-ticket": _export_command, "evaluate-ticket": _evaluate_command}
