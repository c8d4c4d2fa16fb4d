"""Crash-safe checkpoints of a whole training state, through orbax-checkpoint.

A checkpoint holds one pytree of arrays (the training state: step, params, masks, scores,
optimizer state, PRNG key, batch-norm stats, ...) plus a small JSON-able metadata dict
(data position, config, ...). A long run must never lose work, so a save is atomic:

1. everything is written into a hidden temporary directory ``.tmp-step_XXXXXXXX-<hex>``;
2. every file in it is fsynced and its size and sha256 recorded in ``MANIFEST.json``,
   which is written (and fsynced) LAST and carries a checksum of its own content;
3. the temporary directory is renamed to ``step_XXXXXXXX`` (the commit);
4. only then are checkpoints beyond ``max_to_keep`` deleted (renamed to a hidden
   ``.del-...`` name first, so a half-deleted one is never mistaken for a checkpoint).

A SIGKILL at any moment therefore leaves the earlier checkpoints intact, and at worst a
hidden temporary directory that is ignored (and removed by the next save). On restore,
every file is checked against the manifest; a checkpoint without a manifest, with a
missing, truncated or altered file, or that orbax fails to read is skipped with a
``logging.warning`` naming it and the reason, and the previous good one is used.

On-disk layout::

    <directory>/
      step_00000100/              a committed checkpoint
        state/                    orbax StandardCheckpointHandler output: a flat dict
                                  {"leaf_00000": array, ...} in flattening order
        tree.json                 per leaf: key path, shape, dtype (+ PRNG impl)
        metadata.json             the user's metadata dict
        MANIFEST.json             written last: size + sha256 of every other file
      .tmp-step_00000200-<hex>/   a save in progress or killed: ignored
      .del-step_00000050-<hex>/   a checkpoint being deleted: ignored

The pytree structure itself is not stored: ``restore`` takes a template (a concrete
state or a ``jax.eval_shape`` one) and the stored leaf paths, shapes and dtypes are
checked against it, so a mismatch is a clear error rather than a silent wrong restore.

Sharding: each restored ``jax.Array`` is read by orbax directly into the sharding of
the matching template leaf (``jax.Array.sharding`` or ``jax.ShapeDtypeStruct.sharding``),
falling back to the first local device. Orbax reshards on read, so restoring onto a
different device count only needs a template whose leaves carry the new shardings
(e.g. ``jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))``); see
``_restore_target``. Multi-host saving (only process 0 writing the manifest and
committing, with barriers around it) is not implemented yet.

The writer assumes it is the only process saving into ``directory``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import operator
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "CorruptCheckpointError",
    "NoValidCheckpointError",
    "TemplateMismatchError",
]

PyTree = Any

logger = logging.getLogger(__name__)

FORMAT_NAME = "sparsejax.checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
TREE_NAME = "tree.json"
METADATA_NAME = "metadata.json"
STATE_DIR = "state"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_DEL_PREFIX = ".del-"
_CHUNK = 1 << 20


class CheckpointError(Exception):
    """Base class of the errors raised by :mod:`sparsejax.checkpoint`."""


class NoValidCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint in the directory verifies (or the requested step does not exist)."""


class CorruptCheckpointError(CheckpointError):
    """An explicitly requested checkpoint failed verification or could not be read."""


class TemplateMismatchError(CheckpointError, ValueError):
    """The restore template's leaf paths, shapes or dtypes differ from the stored ones."""


# --------------------------------------------------------------------------- logging


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO/DEBUG chatter (it logs through absl) while we call into it."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.active and record.levelno < logging.WARNING:
            return "orbax" not in record.pathname
        return True


_QUIET = _QuietOrbax()
logging.getLogger("absl").addFilter(_QUIET)


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    with _QUIET.lock:
        _QUIET.active += 1
    try:
        yield
    finally:
        with _QUIET.lock:
            _QUIET.active -= 1


# --------------------------------------------------------------------------- files


def _fsync_hash_file(path: Path) -> tuple[int, str]:
    """fsync one file and return its ``(size, sha256 hex)``."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _list_files(root: Path) -> list[str]:
    """Relative POSIX paths of all regular files under ``root``, sorted."""
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file() and not full.is_symlink():
                out.append(full.relative_to(root).as_posix())
    return sorted(out)


def _commit_dir(src: Path, dst: Path) -> None:
    """The commit point of a save: atomically rename the finished directory into place."""
    os.rename(src, dst)
    _fsync_dir(dst.parent)


def _remove_dir(path: Path) -> None:
    """Delete a directory so that a crash part-way never leaves a damaged checkpoint name."""
    doomed = path.parent / f"{_DEL_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _manifest_bytes(body: dict[str, Any]) -> bytes:
    wrapped = {"body": body, "body_sha256": hashlib.sha256(_canonical_json(body)).hexdigest()}
    return json.dumps(wrapped, sort_keys=True, indent=1).encode()


# --------------------------------------------------------------------------- leaves


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _describe(path: str, leaf: Any) -> dict[str, Any]:
    """Shape/dtype description of one leaf of a state or template."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        entry: dict[str, Any] = {"path": path, "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
        if _is_key(leaf):
            data = jax.eval_shape(jax.random.key_data, leaf)
            entry["key_data_shape"] = list(data.shape)
            entry["key_data_dtype"] = str(data.dtype)
            if isinstance(leaf, jax.Array):
                entry["key_impl"] = str(jax.random.key_impl(leaf))
        return entry
    if isinstance(leaf, (np.ndarray, np.generic, bool, int, float, complex)):
        arr = np.asarray(leaf)
        return {"path": path, "shape": list(arr.shape), "dtype": str(arr.dtype)}
    raise TypeError(
        f"checkpoint: unsupported leaf type {type(leaf).__name__} at {path or '<root>'}; "
        "leaves must be jax/numpy arrays or Python scalars"
    )


def _flatten(tree: PyTree) -> tuple[list[Any], list[dict[str, Any]], Any]:
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in path_leaves]
    entries = [_describe(jax.tree_util.keystr(p), leaf) for p, leaf in path_leaves]
    return leaves, entries, treedef


def _leaf_name(i: int) -> str:
    return f"leaf_{i:05d}"


def _saveable(leaf: Any) -> Any:
    """The array orbax writes for one state leaf."""
    if isinstance(leaf, jax.Array):
        return jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return np.asarray(leaf)


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _restore_target(leaf: Any, entry: dict[str, Any]) -> Any:
    """What orbax should restore one template leaf as.

    Real ``np.ndarray``s restore as numpy (keeping 64-bit dtypes); everything jax restores
    as a ``jax.Array`` placed with the template leaf's sharding. This is the one place a
    different device layout plugs in: give template leaves the target shardings.
    """
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        sharding = getattr(leaf, "sharding", None) or _default_sharding()
        if _is_key(leaf):
            shape, dtype = entry["key_data_shape"], entry["key_data_dtype"]
            return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if isinstance(leaf, np.ndarray):
        return leaf
    return np.asarray(leaf)


def _finish_leaf(template_leaf: Any, entry: dict[str, Any], value: Any) -> Any:
    """Turn the array orbax returned (``None`` for zero-size leaves) into the leaf's type."""
    if isinstance(template_leaf, (jax.Array, jax.ShapeDtypeStruct)):
        if value is None:  # zero-size: nothing was written, rebuild from the description
            target = _restore_target(template_leaf, entry)
            value = jax.device_put(jnp.zeros(target.shape, target.dtype), target.sharding)
        if _is_key(template_leaf):
            return jax.random.wrap_key_data(value, impl=entry["key_impl"])
        return value
    if value is None:
        value = np.zeros(entry["shape"], np.dtype(entry["dtype"]))
    if isinstance(template_leaf, np.ndarray):
        return np.asarray(value)
    if isinstance(template_leaf, np.generic):
        return np.asarray(value)[()]
    return np.asarray(value).item()  # Python scalar


def _compare(stored: list[dict[str, Any]], template: list[dict[str, Any]]) -> list[str]:
    """Human-readable differences between stored and template leaf descriptions."""
    problems: list[str] = []
    stored_by_path = {e["path"]: e for e in stored}
    template_by_path = {e["path"]: e for e in template}
    missing = [p for p in stored_by_path if p not in template_by_path]
    extra = [p for p in template_by_path if p not in stored_by_path]
    if missing:
        problems.append(f"in checkpoint but not in template: {_some(missing)}")
    if extra:
        problems.append(f"in template but not in checkpoint: {_some(extra)}")
    for path, s in stored_by_path.items():
        t = template_by_path.get(path)
        if t is None:
            continue
        if s["shape"] != t["shape"]:
            problems.append(
                f"shape of {path}: checkpoint {tuple(s['shape'])}, template {tuple(t['shape'])}"
            )
        if s["dtype"] != t["dtype"]:
            problems.append(f"dtype of {path}: checkpoint {s['dtype']}, template {t['dtype']}")
    if not problems and [e["path"] for e in stored] != [e["path"] for e in template]:
        problems.append("leaves are in a different order (different pytree node types?)")
    return problems


def _some(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Atomic, verified checkpoints of a training-state pytree plus JSON metadata.

    Args:
      directory: where checkpoints live (created on first save).
      max_to_keep: how many good checkpoints to keep; older ones are deleted after a
        new one is committed. ``None`` keeps all.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> ckpt = Checkpointer(tempfile.mkdtemp(), max_to_keep=2)
      >>> state = {"w": jnp.arange(3.0), "key": jax.random.PRNGKey(0)}
      >>> ckpt.save(10, state, {"epoch": 0, "batch": 10})
      >>> ckpt.latest_step()
      10
      >>> step, restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
      >>> step, restored["w"].tolist(), restored["key"].dtype, meta
      (10, [0.0, 1.0, 2.0], dtype('uint32'), {'epoch': 0, 'batch': 10})
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3) -> None:
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or operator.index(max_to_keep) < 1
        ):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        self._directory = Path(directory).expanduser().absolute()
        self._max_to_keep = max_to_keep
        self._orbax: ocp.Checkpointer | None = None

    def __repr__(self) -> str:
        return f"Checkpointer({str(self._directory)!r}, max_to_keep={self._max_to_keep})"

    @property
    def directory(self) -> Path:
        """The checkpoint directory (absolute)."""
        return self._directory

    def _orbax_checkpointer(self) -> ocp.Checkpointer:
        if self._orbax is None:
            with _quiet_orbax():
                self._orbax = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        return self._orbax

    def close(self) -> None:
        """Release orbax resources (the object stays usable)."""
        if self._orbax is not None:
            with _quiet_orbax():
                self._orbax.close()
            self._orbax = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paths / listing

    def _step_path(self, step: int) -> Path:
        return self._directory / f"step_{step:08d}"

    def _step_dirs(self) -> dict[int, Path]:
        """All committed-looking ``step_N`` directories, verified or not."""
        if not self._directory.is_dir():
            return {}
        out: dict[int, Path] = {}
        for child in self._directory.iterdir():
            m = _STEP_RE.match(child.name)
            if m and child.is_dir():
                out[int(m.group(1))] = child
        return dict(sorted(out.items()))

    def _hidden_dirs(self, prefix: str) -> list[Path]:
        if not self._directory.is_dir():
            return []
        return sorted(
            c for c in self._directory.iterdir() if c.name.startswith(prefix) and c.is_dir()
        )

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        """The manifest body of checkpoint ``path``; raises ``ValueError`` saying why not."""
        manifest = path / MANIFEST_NAME
        if not manifest.is_file():
            raise ValueError(f"no {MANIFEST_NAME} (incomplete save)")
        try:
            wrapped = json.loads(manifest.read_bytes())
            body = wrapped["body"]
            recorded = wrapped["body_sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{MANIFEST_NAME} is unreadable ({e})") from e
        if hashlib.sha256(_canonical_json(body)).hexdigest() != recorded:
            raise ValueError(f"{MANIFEST_NAME} checksum mismatch (manifest altered)")
        if body.get("format") != FORMAT_NAME:
            raise ValueError(f"{MANIFEST_NAME} is not a {FORMAT_NAME} manifest")
        if not isinstance(body.get("version"), int) or body["version"] > FORMAT_VERSION:
            raise ValueError(f"unsupported format version {body.get('version')!r}")
        if not isinstance(body.get("files"), dict):
            raise ValueError(f"{MANIFEST_NAME} lists no files")
        return body

    def _problem(self, step: int, path: Path, *, checksums: bool = True) -> str | None:
        """Why checkpoint ``path`` is not usable, or ``None`` if it verifies."""
        try:
            return self._check_files(step, path, checksums=checksums)
        except OSError as e:
            return f"it cannot be read ({type(e).__name__}: {e})"

    def _check_files(self, step: int, path: Path, *, checksums: bool) -> str | None:
        try:
            body = self._read_manifest(path)
        except ValueError as e:
            return str(e)
        if body.get("step") != step:
            return f"manifest is for step {body.get('step')}, not {step}"
        for rel, info in sorted(body["files"].items()):
            f = path / rel
            if not f.is_file():
                return f"file {rel} is missing"
            size = f.stat().st_size
            if size != info["size"]:
                kind = "truncated" if size < info["size"] else "has the wrong size"
                return f"file {rel} is {kind} ({size} bytes, manifest says {info['size']})"
            if checksums and _hash_file(f) != info["sha256"]:
                return f"file {rel} checksum mismatch (sha256 differs from manifest)"
        return None

    def all_steps(self, *, verify_checksums: bool = True) -> list[int]:
        """Steps of the good checkpoints, ascending.

        A checkpoint is good if its manifest is present and intact and every file it lists
        exists with the recorded size and (unless ``verify_checksums=False``, which skips
        reading the data) sha256.
        """
        return [
            s
            for s, p in self._step_dirs().items()
            if self._problem(s, p, checksums=verify_checksums) is None
        ]

    def latest_step(self, *, verify_checksums: bool = True) -> int | None:
        """The newest good step, or ``None`` if there is none (e.g. an empty directory)."""
        for s, p in reversed(self._step_dirs().items()):
            if self._problem(s, p, checksums=verify_checksums) is None:
                return s
        return None

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: PyTree, metadata: Mapping[str, Any] | None = None) -> None:
        """Save ``state`` and ``metadata`` as checkpoint ``step``; returns once committed.

        ``metadata`` must be JSON-serialisable (it comes back through ``json``, so tuples
        become lists). Re-saving an existing step replaces it.
        """
        if isinstance(step, bool):
            raise TypeError("step must be an int, not bool")
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            meta_bytes = json.dumps(dict(metadata), indent=1).encode()
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata is not JSON-serialisable: {e}") from e

        leaves, entries, _ = _flatten(state)
        for leaf, entry in zip(leaves, entries, strict=True):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                raise TypeError(
                    f"cannot save an abstract leaf (ShapeDtypeStruct) at {entry['path']}"
                )
        items: dict[str, Any] = {}
        for i, (leaf, entry) in enumerate(zip(leaves, entries, strict=True)):
            if int(np.prod(entry["shape"])) > 0:  # orbax cannot write zero-size arrays
                items[_leaf_name(i)] = _saveable(leaf)
        tree_bytes = json.dumps({"leaves": entries}, indent=1).encode()

        self._directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        final = self._step_path(step)
        newer = [s for s in self._step_dirs() if s > step]
        if newer:
            logger.warning(
                "checkpoint: saving step %d in %s although newer checkpoints %s exist; "
                "restore() prefers the newest good one",
                step,
                self._directory,
                newer,
            )
        tmp = self._directory / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._write_uncommitted(tmp, step, items, tree_bytes, meta_bytes)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed process leaves it to the next save
            raise
        if final.exists():
            # Directories cannot be renamed over non-empty ones, so the old checkpoint of this
            # step is moved away first; a kill exactly between the two renames loses only it.
            logger.warning("checkpoint: replacing existing checkpoint %s", final)
            _remove_dir(final)
        _commit_dir(tmp, final)
        self._prune(keep=step)

    def _write_uncommitted(
        self, tmp: Path, step: int, items: dict[str, Any], tree_bytes: bytes, meta_bytes: bytes
    ) -> None:
        """Write a complete checkpoint into ``tmp``, the manifest last, everything fsynced."""
        if items:
            with _quiet_orbax():
                self._orbax_checkpointer().save(tmp / STATE_DIR, args=ocp.args.StandardSave(items))
        _write_file(tmp / TREE_NAME, tree_bytes)
        _write_file(tmp / METADATA_NAME, meta_bytes)
        files = {}
        for rel in _list_files(tmp):
            size, sha = _fsync_hash_file(tmp / rel)
            files[rel] = {"size": size, "sha256": sha}
        for dirpath, _, _ in os.walk(tmp):
            _fsync_dir(Path(dirpath))
        body = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "step": step,
            "created_unix": time.time(),
            "orbax_checkpoint_version": ocp.__version__,
            "files": files,
        }
        _write_file(tmp / MANIFEST_NAME, _manifest_bytes(body))  # the last file written
        _fsync_dir(tmp)

    def _remove_leftovers(self) -> None:
        """Delete temporary directories of killed saves and interrupted deletions."""
        for d in self._hidden_dirs(_TMP_PREFIX) + self._hidden_dirs(_DEL_PREFIX):
            logger.info("checkpoint: removing leftover %s", d)
            shutil.rmtree(d, ignore_errors=True)

    def _prune(self, keep: int) -> None:
        """Keep ``keep`` plus the newest ``max_to_keep - 1`` other good checkpoints.

        Goodness here is the cheap check (manifest intact, files present with the right
        sizes), so a save does not re-read the kept checkpoints; the new one was hashed as
        it was written. Checkpoints failing the check are left alone unless older than
        every kept one (then they could never be restored anyway).
        """
        if self._max_to_keep is None:
            return
        dirs = self._step_dirs()
        good = [s for s, p in dirs.items() if self._problem(s, p, checksums=False) is None]
        others = [s for s in good if s != keep]
        kept = {keep, *others[max(0, len(others) - (self._max_to_keep - 1)) :]}
        oldest_kept = min(kept)
        for s, p in dirs.items():
            if s in kept:
                continue
            if s in good or s < oldest_kept:
                logger.info("checkpoint: deleting old checkpoint %s", p)
                _remove_dir(p)

    # ------------------------------------------------------------------ restore

    def restore(self, template: PyTree, step: int | None = None) -> tuple[int, PyTree, dict]:
        """Restore ``(step, state, metadata)`` into the structure of ``template``.

        ``template`` is a concrete state or an abstract one (``jax.eval_shape``); its leaf
        paths, shapes and dtypes must match the stored ones (else ``TemplateMismatchError``).
        ``jax.Array`` / ``ShapeDtypeStruct`` leaves come back as ``jax.Array`` with the
        template leaf's sharding, numpy leaves as numpy, Python scalars as Python scalars.

        With ``step=None``, the newest checkpoint that verifies is used; bad ones are
        skipped with a warning. With an explicit ``step``, that one is verified and loaded
        or ``CorruptCheckpointError`` / ``NoValidCheckpointError`` is raised.
        """
        _, template_entries, _ = _flatten(template)
        dirs = self._step_dirs()
        if step is not None:
            step = operator.index(step)
            path = dirs.get(step)
            if path is None:
                raise NoValidCheckpointError(
                    f"no checkpoint for step {step} in {self._directory} "
                    f"(steps present: {list(dirs)})"
                )
            problem = self._problem(step, path)
            if problem is not None:
                raise CorruptCheckpointError(f"checkpoint {path} is not usable: {problem}")
            try:
                state, meta = self._load(path, template, template_entries)
            except TemplateMismatchError:
                raise
            except Exception as e:
                raise CorruptCheckpointError(
                    f"checkpoint {path} could not be read: {type(e).__name__}: {e}"
                ) from e
            return step, state, meta

        for tmp in self._hidden_dirs(_TMP_PREFIX):
            logger.warning(
                "checkpoint: ignoring incomplete checkpoint %s (its save was interrupted)", tmp
            )
        skipped = []
        for s, path in reversed(dirs.items()):
            problem = self._problem(s, path)
            if problem is None:
                try:
                    state, meta = self._load(path, template, template_entries)
                except TemplateMismatchError:
                    raise
                except Exception as e:
                    problem = (
                        f"it could not be read (orbax or JSON failed: {type(e).__name__}: {e})"
                    )
                else:
                    if skipped:
                        logger.warning(
                            "checkpoint: restored step %d from %s after skipping %d bad "
                            "checkpoint(s)",
                            s,
                            path,
                            len(skipped),
                        )
                    return s, state, meta
            logger.warning("checkpoint: skipping bad checkpoint %s: %s", path, problem)
            skipped.append(f"{path.name}: {problem}")
        detail = ("; ".join(skipped)) if skipped else "it holds no checkpoints"
        raise NoValidCheckpointError(f"no valid checkpoint in {self._directory}: {detail}")

    def _load(
        self, path: Path, template: PyTree, template_entries: list[dict[str, Any]]
    ) -> tuple[PyTree, dict]:
        stored = json.loads((path / TREE_NAME).read_bytes())["leaves"]
        problems = _compare(stored, template_entries)
        if problems:
            raise TemplateMismatchError(
                f"restore template does not match checkpoint {path}: " + "; ".join(problems)
            )
        leaves, treedef = jax.tree_util.tree_flatten(template)
        targets = {
            _leaf_name(i): _restore_target(leaf, entry)
            for i, (leaf, entry) in enumerate(zip(leaves, stored, strict=True))
            if int(np.prod(entry["shape"])) > 0
        }
        restored: dict[str, Any] = {}
        if targets:
            with _quiet_orbax():
                restored = self._orbax_checkpointer().restore(
                    path / STATE_DIR, args=ocp.args.StandardRestore(targets)
                )
        out = [
            _finish_leaf(leaf, entry, restored.get(_leaf_name(i)))
            for i, (leaf, entry) in enumerate(zip(leaves, stored, strict=True))
        ]
        metadata = json.loads((path / METADATA_NAME).read_bytes())
        return jax.tree_util.tree_unflatten(treedef, out), metadata
