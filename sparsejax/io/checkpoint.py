"""Verified checkpoints of a whole training state, on orbax's ``CheckpointManager``.

A checkpoint is one orbax step holding the state pytree (``state/``) and a JSON document
(``metadata/``: the leaf descriptions and the caller's metadata, e.g. the data position),
so the saved data position always matches the saved state. Orbax writes (every process
its shards, asynchronously), commits atomically (a ``step_N.orbax-checkpoint-tmp`` folder
renamed to ``step_N`` once every process has written) and applies ``max_to_keep`` or
keep-best. This module adds what orbax does not give: a ``MANIFEST.json`` (size + sha256
of every file) that the primary process writes before orbax's commit rename, so it is
committed with the checkpoint; a restore that skips, with a ``logging.warning`` naming it
and the reason, every checkpoint that disagrees with its manifest or that orbax cannot
read, and uses the previous good one; and the template checks, PRNG key and zero-size
leaves and restoring into the template's shardings of :mod:`sparsejax.io.checkpoint_leaves`.
A committed checkpoint without a manifest was not made by a completed save here (it is
half-deleted, altered, or from another tool) and counts as bad. Checkpoints of the
previous sparsejax format (``tree.json`` and ``metadata.json`` beside ``state/``) are read
and verified, never written. Layout and guarantees: docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_policies

from sparsejax.core.validation import check_local_path
from sparsejax.io import checkpoint_leaves as leaves_lib
from sparsejax.io.checkpoint_manifest import FORMAT_NAME, FORMAT_VERSION
from sparsejax.io.checkpoint_manifest import manifest_problem as _manifest_problem
from sparsejax.io.checkpoint_manifest import write_manifest as _write_manifest

__all__ = ["Checkpointer", "CheckpointError", "CorruptCheckpointError",
           "NoValidCheckpointError", "TemplateMismatchError"]

PyTree = Any
logger = logging.getLogger(__name__)

LEGACY_TREE, LEGACY_METADATA = "tree.json", "metadata.json"  # format 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(Exception):
    """Base class of the errors raised by :mod:`sparsejax.io.checkpoint`."""


class NoValidCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint in the directory verifies (or the requested step does not exist)."""


class CorruptCheckpointError(CheckpointError):
    """An explicitly requested checkpoint failed verification or could not be read."""


class TemplateMismatchError(CheckpointError, ValueError):
    """The restore template's leaf paths, shapes or dtypes differ from the stored ones."""


class _QuietOrbax(logging.Filter):
    """Drops orbax's INFO/DEBUG chatter (it logs through absl, also from its threads) and
    the tracebacks of its errors: a failed save is raised here as a ``CheckpointError``
    naming its cause, so orbax's own report of it stays one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


logging.getLogger("absl").addFilter(_QuietOrbax())


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Verified checkpoints of a training-state pytree plus JSON metadata.

    Args:
      directory: where checkpoints live (created on the first save).
      max_to_keep: how many checkpoints to keep (``None``: all). Old ones are deleted
        only after a new one is committed.
      async_save: ``save`` returns once the arrays are copied off the device and the
        write goes on in the background (the training loop's choice); the next
        ``save``, every read (``restore``, ``latest_step``, ...),
        ``wait_until_finished`` and ``close`` wait for it and raise its error if it
        failed. The files are the same as a synchronous save's (the default), which
        returns once the checkpoint is committed.
      best_metric: keep the ``max_to_keep`` best checkpoints by this key of the
        ``metrics`` passed to ``save`` (plus always the newest, to resume from)
        instead of the newest ``max_to_keep``.
      best_mode: ``"min"`` (e.g. a loss) or ``"max"`` (e.g. an accuracy).

    Every process of a multi-process run must make the same calls; orbax coordinates the
    writes and the commit, and the primary process alone writes the manifest.

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
      >>> ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3,
                 async_save: bool = False, best_metric: str | None = None,
                 best_mode: str = "min") -> None:
        if max_to_keep is not None and (
                isinstance(max_to_keep, bool) or operator.index(max_to_keep) < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        check_local_path(directory, "checkpoint directory")
        self._directory = Path(directory).expanduser().absolute()
        self._max_to_keep = max_to_keep
        self._async = bool(async_save)
        self._best_metric, self._best_mode = best_metric, best_mode
        self._manager: ocp.CheckpointManager | None = None
        self._reader: ocp.Checkpointer | None = None
        self._pending: int | None = None  # the step whose save may still be running
        self._writing = -1  # the step of the latest save (for orbax's hook)

    def __repr__(self) -> str:
        return (f"Checkpointer({str(self._directory)!r}, max_to_keep={self._max_to_keep}, "
                f"async_save={self._async})")

    @property
    def directory(self) -> Path:
        """The checkpoint directory (absolute)."""
        return self._directory

    def _get_manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            keep: dict[str, Any] = {"max_to_keep": self._max_to_keep}
            if self._best_metric is not None:
                metric = self._best_metric

                def score(metrics: Mapping[str, float]) -> float:
                    return float(metrics[metric])

                # orbax keeps the best; the newest is kept too, as the one to resume from
                keep = {"best_fn": score, "best_mode": self._best_mode,
                        "preservation_policy": ocp_policies.AnyPreservationPolicy([
                            ocp_policies.LatestN(n=1),
                            ocp_policies.BestN(get_metric_fn=score,
                                               reverse=self._best_mode == "min",
                                               n=self._max_to_keep,
                                               keep_checkpoints_without_metrics=False)])}
            options = ocp.CheckpointManagerOptions(
                step_prefix="step", step_format_fixed_length=8, create=True,
                cleanup_tmp_directories=True, enable_async_checkpointing=True,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._on_written),
                **keep)
            self._manager = ocp.CheckpointManager(
                self._directory, options=options, item_names=("state", "metadata"))
        return self._manager

    def _on_written(self) -> None:
        """orbax's hook on the primary process: all processes have written the pending
        step, which is not committed yet; its manifest goes in before the commit."""
        step = self._writing
        name = self.step_dir(step).name
        tmp = sorted(self._directory.glob(name + _TMP_MARK + "*"))
        if not tmp:
            raise CheckpointError(f"checkpoint: orbax's temporary folder for {name} is missing")
        _write_manifest(tmp[-1], step)

    def wait_until_finished(self) -> None:
        """Wait for a background save; raise ``CheckpointError`` if it failed."""
        if self._manager is None or self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(
                f"checkpoint: the save of step {step} in {self._directory} failed: "
                f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Wait for a background save, then release orbax's resources (stays usable)."""
        try:
            self.wait_until_finished()
        finally:
            if self._manager is not None:
                self._manager.close()
                self._manager = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ listing

    def step_dirs(self) -> dict[int, Path]:
        """Every committed ``step_N`` folder, ascending, whether it verifies or not."""
        if not self._directory.is_dir():
            return {}
        found = {int(m.group(1)): c for c in self._directory.iterdir()
                 if (m := _STEP_RE.match(c.name)) and c.is_dir()}
        return dict(sorted(found.items()))

    def step_dir(self, step: int) -> Path:
        """The folder of checkpoint ``step`` (committed or not)."""
        return self._directory / f"step_{step:08d}"

    @staticmethod
    def _problem(step: int, path: Path, verify_checksums: bool = True) -> str | None:
        """Why checkpoint ``step`` in ``path`` is not usable, or ``None`` if it verifies."""
        try:
            return _manifest_problem(path, step, verify_checksums)
        except OSError as e:
            return f"it cannot be read ({type(e).__name__}: {e})"

    def problems(self, *, verify_checksums: bool = True) -> dict[int, str | None]:
        """Per committed step, why it is not usable, or ``None`` if its files verify."""
        self.wait_until_finished()
        return {step: self._problem(step, path, verify_checksums)
                for step, path in self.step_dirs().items()}

    def all_steps(self, *, verify_checksums: bool = True) -> list[int]:
        """Steps of the good checkpoints (manifest intact, every file it lists present
        with its size and, unless ``verify_checksums=False``, its sha256), ascending."""
        return [s for s, p in self.problems(verify_checksums=verify_checksums).items()
                if p is None]

    def latest_step(self, *, verify_checksums: bool = True) -> int | None:
        """The newest good step, or ``None`` if there is none (e.g. an empty directory);
        checked newest first, so only the checkpoints newer than it are read too."""
        self.wait_until_finished()
        for step, path in reversed(self.step_dirs().items()):
            if self._problem(step, path, verify_checksums) is None:
                return step
        return None

    def best_step(self) -> int | None:
        """The good step with the best ``best_metric`` (keep-best), or ``None`` if no good
        step has metrics; restore it with ``restore(template, step=best_step())``."""
        if self._best_metric is None:
            raise ValueError("best_step needs a Checkpointer made with best_metric=...")
        scored = []
        for step in self.all_steps():  # good steps only; orbax's metrics file of each
            path = self.step_dir(step) / "metrics" / "metrics"
            try:
                value = json.loads(path.read_text())[self._best_metric]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            scored.append((float(value), step))
        if not scored:
            return None
        pick = min if self._best_mode == "min" else max
        return pick(scored)[1]

    def read_metadata(self, step: int) -> dict[str, Any]:
        """The metadata dict saved with ``step`` (JSON only: nothing is verified)."""
        self.wait_until_finished()
        return self._read_json(self.step_dir(step))[1]

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: PyTree, metadata: Mapping[str, Any] | None = None, *,
             metrics: Mapping[str, float] | None = None) -> None:
        """Save ``state`` and ``metadata`` as checkpoint ``step`` (see ``async_save``).

        ``metadata`` must be JSON-serialisable (tuples come back as lists); ``metrics``
        (a dict of numbers) must hold ``best_metric`` when one is set. Re-saving an
        existing step replaces it.
        """
        if isinstance(step, bool):
            raise TypeError("step must be an int, not bool")
        step = operator.index(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        if self._best_metric is not None and self._best_metric not in (metrics or {}):
            raise ValueError(f"save needs metrics[{self._best_metric!r}]: this Checkpointer "
                             "keeps the best checkpoints by it")
        items, entries = leaves_lib.save_items(state)
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "leaves": entries,
                    "metadata": dict(metadata)}
        try:
            json.dumps(document)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
        if not items:
            items = {"none": np.zeros(1, np.uint8)}  # orbax needs an array

        self.wait_until_finished()
        manager = self._get_manager()
        existing = self.step_dirs()
        newer = [s for s in existing if s > step]
        if newer:
            logger.warning("checkpoint: saving step %d in %s although newer checkpoints %s "
                           "exist; restore() prefers the newest good one",
                           step, self._directory, newer)
        replace = step in existing
        if jax.process_count() > 1:  # one decision for all: orbax's delete is collective
            replace = bool(multihost_utils.broadcast_one_to_all(np.int32(replace)))
        if replace:
            logger.warning("checkpoint: replacing existing checkpoint step %d in %s", step,
                           self._directory)
            manager.reload()
            manager.delete(step)
        self._pending = self._writing = step
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(items), metadata=ocp.args.JsonSave(document)),
            metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
            force=True)
        if not self._async:
            self.wait_until_finished()

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
        _, wanted, _ = leaves_lib.flatten(template)
        self.wait_until_finished()
        dirs = self.step_dirs()
        if step is not None:
            step = operator.index(step)
            if step not in dirs:
                raise NoValidCheckpointError(f"no checkpoint for step {step} in "
                                             f"{self._directory} (steps present: {list(dirs)})")
        for tmp in sorted(self._directory.glob("*" + _TMP_MARK + "*")):
            logger.warning("checkpoint: ignoring incomplete checkpoint %s (its save was "
                           "interrupted)", tmp)
        skipped: list[str] = []
        for s in [step] if step is not None else reversed(list(dirs)):
            problem = self._problem(s, dirs[s])  # newest first: older ones only if needed
            if problem is None:
                try:
                    state, meta = self._load(dirs[s], template, wanted)
                except TemplateMismatchError:
                    raise
                except Exception as e:
                    problem = (f"it could not be read (orbax or JSON failed: "
                               f"{type(e).__name__}: {e})")
                else:
                    if skipped:
                        logger.warning("checkpoint: restored step %d from %s after skipping "
                                       "%d bad checkpoint(s)", s, dirs[s], len(skipped))
                    return s, state, meta
            if step is not None:
                raise CorruptCheckpointError(f"checkpoint {dirs[s]} is not usable: {problem}")
            logger.warning("checkpoint: skipping bad checkpoint %s: %s", dirs[s], problem)
            skipped.append(f"{dirs[s].name}: {problem}")
        detail = "; ".join(skipped) if skipped else "it holds no checkpoints"
        raise NoValidCheckpointError(f"no valid checkpoint in {self._directory}: {detail}")

    @staticmethod
    def _read_json(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """``(leaf descriptions, user metadata)`` of checkpoint ``path`` (either format)."""
        if (path / LEGACY_TREE).is_file():  # format 1
            entries = json.loads((path / LEGACY_TREE).read_bytes())["leaves"]
            return entries, json.loads((path / LEGACY_METADATA).read_bytes())
        document = json.loads((path / "metadata" / "metadata").read_bytes())
        return document["leaves"], document["metadata"]

    def _load(self, path: Path, template: PyTree,
              template_entries: list[dict[str, Any]]) -> tuple[PyTree, dict]:
        stored, metadata = self._read_json(path)
        problems = leaves_lib.compare(stored, template_entries)
        if problems:
            raise TemplateMismatchError(
                f"restore template does not match checkpoint {path}: " + "; ".join(problems))
        targets = leaves_lib.restore_targets(template, stored)
        restored: dict[str, Any] = {}
        if targets:
            if self._reader is None:
                self._reader = ocp.Checkpointer(ocp.StandardCheckpointHandler())
            restored = self._reader.restore(path / "state",
                                            args=ocp.args.StandardRestore(targets))
        return leaves_lib.rebuild(template, stored, restored), metadata
