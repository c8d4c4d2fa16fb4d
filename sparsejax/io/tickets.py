"""Ticket files: masks packed one bit per weight, with digests of the weights they apply to.

A strong ticket never trains its weights, so it is described by how its frozen weights
were drawn and one bit per weight. This module holds the file format and the tickets of a
method's state (a model of the user's own: :func:`sparsejax.nnx.export_ticket`,
:func:`sparsejax.linen.export_ticket`); the tickets of a finished run folder, whose
weights are regenerated from the run's config and seed, are the harness's
(:mod:`sparsejax.harness.tickets`).

The file is a NumPy ``.npz`` archive (deflate-compressed, read with
``allow_pickle=False``) holding:

* ``header``: UTF-8 JSON: format and version, one row per mask leaf (path, shape, kept
  count), sha256 digests of the frozen weights and of the effective weights, which
  loading checks, and what rebuilt the weights (a run's config and seed, or the method);
* ``mask_NNNNN``: each leaf's bool mask packed eight to a byte (``np.packbits`` of the
  row-major mask; about one bit per weight);
* ``state_NNNNN``: model-state leaves evaluation needs (a run's batch-norm statistics).

:func:`export_state_ticket` writes the packed masks and digests from a method and its
state; :func:`load_state_ticket` applies them to a state whose frozen weights the user
rebuilt the same way (checked against the digest).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import path_str
from sparsejax.io.files import write_atomic

__all__ = [
    "TICKET_FORMAT",
    "TICKET_VERSION",
    "check_contents",
    "export_state_ticket",
    "load_state_ticket",
    "pack_masks",
    "read_archive",
    "tree_digest",
    "unpack_masks",
    "write_archive",
]

TICKET_FORMAT = "sparsejax.ticket"
TICKET_VERSION = 1
PyTree = Any


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


def write_archive(output: Path, header: dict[str, Any], packed: list[np.ndarray],
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
    write_archive(output, header, packed)
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
    header, arrays = read_archive(path)
    if "frozen_params_sha256" not in header or header.get("method") != method.name:
        raise ValueError(f"{path} is a ticket of method {header.get('method')!r} "
                         f"({header.get('source', 'a training run')}), not of {method.name!r}")
    check_contents(path, header, arrays, ("masks", "effective_params_sha256"))
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


NOT_A_TICKET = "is not a sparsejax ticket (an .npz file written by sparsejax export-ticket)"


def read_archive(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with open(path, "rb") as handle:
            start = handle.read(4)
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror or error})") from error
    if start and not start.startswith(b"PK"):  # np.load would try it as a pickle or .npy
        what = ("a JSON file (a result.json?)" if start.lstrip()[:1] in (b"{", b"[") else
                "an .npy array" if start.startswith(b"\x93NUM") else "not an .npz archive")
        raise ValueError(f"{path} {NOT_A_TICKET}: it is {what}")
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


def check_contents(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray],
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
