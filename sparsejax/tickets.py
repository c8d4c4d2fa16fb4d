"""Strong lottery tickets as files: a weight seed plus a bitmask.

A strong ticket never trains its weights, so a finished run of a frozen-weight method
(``edge_popup``, ``biprop``) is fully described by the recipe that drew the weights (the
run's config and seed) and one bit per weight. ``sparsejax export-ticket RUN_DIR`` reads a
finished run folder (``result.json`` and the newest checkpoint) and writes a ticket file;
:func:`load_ticket` regenerates the frozen weights from the seed, applies the masks, and
gives predictions bitwise equal to the trained run's.

The file is a NumPy ``.npz`` archive (deflate-compressed, read with
``allow_pickle=False``) holding:

* ``header``: UTF-8 JSON: format and version, the run's full config, the number of
  classes and the input shape, the run's length (for methods that schedule by step), the
  weight recipe (``init_key, method_key = split(PRNGKey(seed))``; the model's params are
  initialised with ``init_key`` and the method draws its frozen weights in
  ``method.init(params, method_key)``), one row per mask leaf (path, shape, kept count),
  the model-state leaves, and sha256 digests of the regenerated frozen weights and of the
  effective weights, which loading checks;
* ``mask_NNNNN``: each leaf's bool mask packed eight to a byte (``np.packbits`` of the
  row-major mask; about one bit per weight);
* ``state_NNNNN``: the leaves of the model state that evaluation needs, stored as they
  are (float32 batch-norm running means and variances; none for LeNet-300-100).

Exporting refuses a run whose weights are not the ones its seed draws (a method that
trained them), or whose effective weights are not a function of weights and masks alone.

A model of the user's own (:mod:`sparsejax.nnx`, :mod:`sparsejax.linen`) has no run
config to draw its weights from: :func:`export_state_ticket` writes the same packed masks
and digests from a method and its state, without a config, and
:func:`load_state_ticket` applies them to a state whose frozen weights the user rebuilt
the same way (checked against the digest).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax._tree import path_str
from sparsejax.files import write_atomic

__all__ = [
    "TICKET_FORMAT",
    "TICKET_VERSION",
    "Ticket",
    "export_state_ticket",
    "load_state_ticket",
    "pack_masks",
    "unpack_masks",
    "tree_digest",
    "export_ticket",
    "load_ticket",
    "evaluate_ticket",
    "add_commands",
]

TICKET_FORMAT = "sparsejax.ticket"
TICKET_VERSION = 1
PyTree = Any


class Ticket(NamedTuple):
    """A loaded ticket.

    Attributes:
      model: the Flax model of the run.
      params: the effective params (frozen weights under the hard masks).
      model_state: non-trainable collections evaluation needs (``{}`` for LeNet).
      masks: the bool masks, with the params' structure.
      config: the run's :class:`~sparsejax.training.loop.TrainConfig`.
      header: the file's JSON header.
    """

    model: Any
    params: PyTree
    model_state: PyTree
    masks: PyTree
    config: Any
    header: dict[str, Any]


def pack_masks(masks: PyTree) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Bit-pack every leaf of a bool mask tree: ``(rows, packed arrays)``, one row
    (path, shape, kept count) and one ``uint8`` array of ``ceil(size / 8)`` bytes per leaf.

    >>> import numpy as np
    >>> rows, packed = pack_masks({"w": np.array([[True, False, True], [True, True, False]])})
    >>> rows, packed[0].tolist()
    ([{'path': 'w', 'shape': [2, 3], 'kept': 4}], [184])
    """
    rows, packed = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(masks)[0]:
        mask = np.asarray(leaf)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask {path_str(path)!r} must be bool, got {mask.dtype}")
        rows.append({"path": path_str(path), "shape": list(mask.shape),
                     "kept": int(mask.sum())})
        packed.append(np.packbits(mask.ravel()))
    return rows, packed


def unpack_masks(rows: list[dict[str, Any]], packed: list[np.ndarray],
                 template: PyTree) -> PyTree:
    """The inverse of :func:`pack_masks` into the structure of ``template`` (whose leaf
    paths and shapes must match the rows).

    >>> import numpy as np
    >>> m = {"w": np.array([[True, False, True], [True, True, False]])}
    >>> back = unpack_masks(*pack_masks(m), template=m)
    >>> bool(np.array_equal(back["w"], m["w"]))
    True
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(flat) != len(rows):
        raise ValueError(f"the ticket has {len(rows)} masks; the model has {len(flat)} leaves")
    leaves = []
    for (path, leaf), row, bits in zip(flat, rows, packed, strict=True):
        shape = tuple(np.shape(leaf))
        if row["path"] != path_str(path) or tuple(row["shape"]) != shape:
            raise ValueError(
                f"ticket mask {row['path']!r} {tuple(row['shape'])} does not match the "
                f"model's leaf {path_str(path)!r} {shape}")
        size = int(np.prod(shape))
        mask = np.unpackbits(np.asarray(bits, np.uint8), count=size).astype(bool)
        if int(mask.sum()) != row["kept"]:
            raise ValueError(f"ticket mask {row['path']!r} is damaged: {int(mask.sum())} "
                             f"bits set, the header says {row['kept']}")
        leaves.append(mask.reshape(shape))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def tree_digest(tree: PyTree) -> str:
    """sha256 over the paths, shapes, dtypes and bytes of every leaf (bitwise identity).

    >>> import numpy as np
    >>> tree_digest({"w": np.zeros(2, np.float32)}) == tree_digest({"w": np.zeros(2)})
    False
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{path_str(path)}|{array.shape}|{array.dtype}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


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
    (:func:`sparsejax.training.loop.prepare`), without loading the data."""
    from sparsejax.models import get_model, init_model
    from sparsejax.training.loop import build_method
    from sparsejax.training.optim import make_optimizer

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


def _write_archive(output: Path, header: dict[str, Any], packed: list[np.ndarray],
                   arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write header, packed masks and ``arrays`` as a ticket file, atomically."""
    content = {"header": np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)}
    content.update({f"mask_{i:05d}": bits for i, bits in enumerate(packed)})
    content.update(arrays or {})
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **content)
    write_atomic(output, buffer.getvalue())  # no half or .tmp ticket left on a full disk


def export_state_ticket(method: Any, state: Any, output: str | os.PathLike[str], *,
                        source: str = "sparsejax") -> dict[str, Any]:
    """Write the ticket of a method's state whose ``params`` are the frozen weights (a
    model of the user's own: :func:`sparsejax.nnx.export_ticket`,
    :func:`sparsejax.linen.export_ticket`): the hard masks bit-packed, and sha256 digests
    of the frozen and the effective weights, which :func:`load_state_ticket` checks. The
    weights themselves are not written: the loader rebuilds them as it built them.

    Raises ``ValueError`` when the effective weights are not a function of the frozen
    weights and the masks.
    """
    masks = jax.device_get(method.hard_masks(state))
    effective_digest = tree_digest(method.effective_params(state))
    if tree_digest(method.params_with_masks(state, masks)) != effective_digest:
        raise ValueError(f"the effective weights of method {method.name!r} depend on more "
                         "than the frozen weights and the masks; it cannot be a ticket")
    rows, packed = pack_masks(masks)
    header = {"format": TICKET_FORMAT, "version": TICKET_VERSION, "source": source,
              "method": method.name, "step": int(state.step), "masks": rows,
              "frozen_params_sha256": tree_digest(state.params),
              "effective_params_sha256": effective_digest, "jax_version": jax.__version__}
    output = Path(output)
    _write_archive(output, header, packed)
    return {"ticket": str(output), "ticket_bytes": output.stat().st_size,
            "packed_mask_bytes": int(sum(b.nbytes for b in packed)),
            "weights": sum(int(np.prod(r["shape"])) for r in rows),
            "kept": int(sum(r["kept"] for r in rows))}


def load_state_ticket(method: Any, state: Any,
                      path: str | os.PathLike[str]) -> tuple[PyTree, PyTree, dict[str, Any]]:
    """``(effective params, masks, header)`` of a ticket written by
    :func:`export_state_ticket`, for ``state`` holding the same frozen weights (rebuilt
    as they were built: same model init, same method key); its masks are replaced.

    Raises ``ValueError`` when ``state.params`` or the rebuilt effective weights differ
    from the exported ones, or the ticket is of another method.
    """
    path = Path(path)
    header, arrays = _read_archive(path)
    if "frozen_params_sha256" not in header or header.get("method") != method.name:
        raise ValueError(f"{path} is a ticket of method {header.get('method')!r} "
                         f"({header.get('source', 'a training run')}), not of {method.name!r}")
    _check_contents(path, header, arrays, ("masks", "effective_params_sha256"))
    if tree_digest(state.params) != header["frozen_params_sha256"]:
        raise ValueError(f"the frozen weights differ from those {path} was exported with")
    packed = [arrays[f"mask_{i:05d}"] for i in range(len(header["masks"]))]
    masks = jax.tree_util.tree_map(jnp.asarray, unpack_masks(
        header["masks"], packed, jax.device_get(state.params)))
    params = method.params_with_masks(state, masks)
    if tree_digest(params) != header["effective_params_sha256"]:
        raise ValueError(f"the effective weights rebuilt from {path} differ from the "
                         "exported ones")
    return params, masks, header


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
    from sparsejax.prune_run import restore_run
    from sparsejax.validation import check_writable_file

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
    _write_archive(output, header, packed,
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


_NOT_A_TICKET = "is not a sparsejax ticket (an .npz file written by sparsejax export-ticket)"


def _read_archive(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror or error})") from error
    if start and not start.startswith(b"PK"):  # np.load would try it as a pickle or .npy
        what = ("a JSON file (a result.json?)" if start.lstrip()[:1] in (b"{", b"[") else
                "an .npy array" if start.startswith(b"\x93NUM") else "not an .npz archive")
        raise ValueError(f"{path} {_NOT_A_TICKET}: it is {what}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except EOFError as error:  # what np.load raises for an empty file
        raise ValueError(f"{path} is not a sparsejax ticket file: the file is empty") from error
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a sparsejax ticket file: {error}") from error
    if "header" not in arrays:
        raise ValueError(f"{path} is not a sparsejax ticket file: no header")
    try:
        header = json.loads(arrays.pop("header").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: the ticket header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the ticket header is not a JSON object")
    if header.get("format") != TICKET_FORMAT:
        raise ValueError(f"{path} is not a sparsejax ticket file (format "
                         f"{header.get('format')!r})")
    if header.get("version") != TICKET_VERSION:
        raise ValueError(f"{path} has ticket format version {header.get('version')}; this "
                         f"sparsejax reads version {TICKET_VERSION}")
    return header, arrays


def _check_contents(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray],
                    keys: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first header key or array a damaged ticket lacks,
    before anything is regenerated from it."""
    missing = [key for key in keys if key not in header]
    if missing:
        raise ValueError(f"{path} is damaged: its header lacks {', '.join(map(repr, missing))}")
    names = [f"mask_{i:05d}" for i in range(len(header["masks"]))]
    names += [f"state_{i:05d}" for i in range(len(header.get("model_state", ())))]
    absent = [name for name in names if name not in arrays]
    if absent:
        raise ValueError(f"{path} is damaged: it lacks the array(s) {', '.join(absent)}")


_TICKET_KEYS = ("config", "num_classes", "input_shape", "total_steps", "batches_per_epoch",
                "frozen_params_sha256", "effective_params_sha256", "masks", "model_state")


def load_ticket(path: str | os.PathLike[str]) -> Ticket:
    """Regenerate a ticket's frozen weights from its seed and apply its masks.

    Raises ``ValueError`` when the regenerated weights or the effective weights differ
    from the exported run's (their sha256 digests are in the header), e.g. under a JAX
    version whose random numbers differ.
    """
    from sparsejax.training.loop import TrainConfig

    path = Path(path)
    header, arrays = _read_archive(path)
    if "config" not in header:
        raise ValueError(f"{path} was exported from a model ({header.get('source')}); load "
                         "it with that module's load_ticket")
    _check_contents(path, header, arrays, _TICKET_KEYS)
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
    from sparsejax.training.loop import evaluate, load_run_dataset, make_eval_step

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
