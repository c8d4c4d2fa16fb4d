"""The run folder ``--out`` of ``sparsejax train``: ``OUT/config.json``, and what
``--resume`` and ``--overwrite`` may do to a folder that already holds a run (a resume
must continue the same run; history is never destroyed without ``--overwrite``)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparsejax.harness.training.config import TrainConfig
from sparsejax.io.checkpoint import Checkpointer, NoValidCheckpointError
from sparsejax.io.files import read_json, tmp_path

__all__ = ["RESUMABLE_FIELDS", "CONFIG_FILE", "RUN_FILES", "config_differences",
           "check_resume", "check_resume_data", "holds_run", "clear_run", "jsonable",
           "saved_run", "run_lock", "LOCK_FILE", "FinishedRun", "restore_finished_run",
           "check_start"]


RESUMABLE_FIELDS = frozenset({
    "epochs", "steps", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints",
    "tensorboard", "out", "resume", "overwrite", "progress", "data_dir", "nonfinite",
    "max_skipped_fraction", "parallel",
    # the effective values of a recipe's fields are compared, not how they were chosen
    "recipe",
})
CONFIG_FILE = "config.json"  # OUT/config.json: the configuration of the run in OUT
RUN_FILES = ("result.json", "metrics.jsonl", CONFIG_FILE, "checkpoints", "tensorboard")


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def _flag(name: str) -> str:
    return {"model_options": "--model-option", "method_options": "--method-option"}.get(
        name, "--" + name.replace("_", "-"))


def config_differences(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """``'--sparsity was 0.9, now 0.5'`` for each result-changing field of ``config`` that
    differs from the ``saved`` configuration (a field absent from ``saved`` is compared
    with its default)."""
    now = jsonable(dataclasses.asdict(config))
    defaults = jsonable(dataclasses.asdict(type(config)()))
    saved = jsonable(saved)
    return [f"{_flag(name)} was {saved.get(name, defaults[name])!r}, now {now[name]!r}"
            for name in now if name not in RESUMABLE_FIELDS
            and saved.get(name, defaults[name]) != now[name]]


def saved_run(out: Path, checkpointer: Checkpointer, step: int | None) -> dict[str, Any] | None:
    """What ``out`` records of its run (``{"config": ..., ...}``): ``config.json``, else the
    metadata of checkpoint ``step``, else ``result.json``; ``None`` if nothing."""
    def from_file(path: Path) -> Any:
        return read_json(path, expect=None) if _holds_data(path) else None

    readers = [(out / CONFIG_FILE, lambda: from_file(out / CONFIG_FILE))]
    if step is not None:  # the metadata saved with the checkpoint
        readers.append((checkpointer.directory / f"step {step}",
                        lambda: checkpointer.read_metadata(step)))
    readers.append((out / "result.json", lambda: from_file(out / "result.json")))
    for path, read in readers:
        try:
            saved = read()
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} cannot be read ({e}), so --resume cannot check "
                             "that it continues the same run") from e
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            return saved
    return None


def holds_run(out: Path) -> list[str]:
    """The files of a run already in ``out``."""
    # an empty file (left by a write that failed, in older versions) holds nothing
    found = [name for name in ("result.json", "metrics.jsonl") if _holds_data(out / name)]
    if Checkpointer(out / "checkpoints").step_dirs():
        found.append("checkpoints/")
    return found


def _holds_data(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def clear_run(out: Path) -> None:
    """Remove the run files of ``out`` (``--overwrite``), and the temporary files a
    process killed while writing one of them may have left (``result.json.tmp``)."""
    import shutil

    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        tmp_path(path).unlink(missing_ok=True)


def check_resume_data(fingerprint: dict[str, Any], checkpointer: Checkpointer,
                      step: int) -> None:
    """Refuse to resume checkpoint ``step`` on data whose ``fingerprint``
    (:meth:`sparsejax.harness.data.Dataset.fingerprint`) differs from the one saved with it
    (checkpoints written before fingerprints were saved are not checked)."""
    recorded = checkpointer.read_metadata(step).get("data")
    if not isinstance(recorded, dict) or recorded == jsonable(fingerprint):
        return
    differ = [f"{key} was {recorded.get(key)!r}, now {value!r}"
              for key, value in jsonable(fingerprint).items() if recorded.get(key) != value]
    raise ValueError(
        f"--resume: the data differs from what the checkpoint at step {step} in "
        f"{checkpointer.directory} was trained on ({'; '.join(differ)}); point --dataset "
        "and --data-dir at the run's data, or start another run with another --out")


def check_resume(config: TrainConfig, out: Path, checkpointer: Checkpointer) -> int | None:
    """Host-side checks of ``--resume`` before anything is built or written: the newest
    good checkpoint step (``None``: there is nothing to resume, start fresh)."""
    step = checkpointer.latest_step()
    saved = saved_run(out, checkpointer, step)
    if saved is not None:
        differences = config_differences(saved["config"], config)
        if differences:
            raise ValueError(
                f"--resume would continue the run in {out} with another configuration: "
                f"{'; '.join(differences)} (use the run's options, or another --out)")
    if step is not None:  # the checkpoint's own record, which an edited config.json hides
        recorded = checkpointer.read_metadata(step).get("config")
        differences = ([] if not isinstance(recorded, dict)
                       else config_differences(recorded, config))
        if differences:
            raise ValueError(
                f"--resume: the checkpoint at step {step} in {checkpointer.directory} was "
                f"saved by another configuration than this one: {'; '.join(differences)} "
                f"(was {out / CONFIG_FILE} edited? use the checkpoint's options)")
    if step is None:
        damaged = checkpointer.problems()
        if damaged:
            reasons = "; ".join(f"step {s}: {problem}" for s, problem in damaged.items())
            raise NoValidCheckpointError(
                f"--resume found no good checkpoint in {checkpointer.directory} ({reasons}); "
                "nothing was changed in --out: restore a checkpoint, or start the run "
                "again with --overwrite")
        if _holds_data(out / "result.json"):
            raise NoValidCheckpointError(
                f"--resume found a finished run in {out} but no checkpoint to continue it "
                "from; nothing was changed: pass --overwrite to train it again")
    return step


LOCK_FILE = ".lock"  # OUT/.lock, held (flock) by the process training into OUT


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``OUT/.lock`` while a run trains into ``out``: a second
    process on the same folder gets a ``FileExistsError`` at once instead of racing the
    first one's checkpoints and metrics. The kernel releases the lock when the process
    ends, however it ends, so a killed run never leaves a stale lock behind."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    if lock.is_dir():  # open() would say only "[Errno 21] Is a directory"
        raise ValueError(
            f"{lock} is a folder, not the lock file sparsejax keeps in --out {out} (a "
            "process training into --out holds it); move that folder away and run again")
    handle = open(lock, "a")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FileExistsError(
            f"--out {out} is in use by another sparsejax process (it holds {out / LOCK_FILE}); "
            "wait for it to finish or choose another --out") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@dataclasses.dataclass
class FinishedRun:
    """A finished run folder restored: its config (effective values), the prepared run
    (data, model, method) and the state of its newest good checkpoint at ``step``."""

    config: Any
    run: Any
    step: int
    state: Any
    result: dict[str, Any]  # the run's result.json
    checkpoint_dir: Path  # the folder of the checkpoint restored


def restore_finished_run(run_dir: str | Path,
                         data_dir: str | Path | None = None) -> FinishedRun:
    """Restore the run in ``run_dir`` (``result.json`` and ``checkpoints/``) as it ran; its
    data from ``data_dir`` when given (the folder may have moved: it does not change the
    run), else from where it trained."""
    from sparsejax.harness.training.setup import prepare
    from sparsejax.io.files import read_json

    run_dir = Path(run_dir)
    result_file = run_dir / "result.json"
    if not result_file.exists():
        raise FileNotFoundError(f"{result_file} not found: is {run_dir} a finished run folder?")
    result = read_json(result_file, "a sparsejax result")
    if not isinstance(result.get("config"), dict):
        raise ValueError(f"{result_file} holds no \"config\": not a sparsejax result")
    config = TrainConfig.from_saved(result["config"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=str(data_dir))
    run = prepare(config)
    with Checkpointer(run_dir / "checkpoints") as checkpointer:
        step, state, _ = checkpointer.restore(run.state)
        checkpoint_dir = checkpointer.step_dir(step)
    return FinishedRun(config, run, step, state, result, checkpoint_dir)


def check_start(config: TrainConfig, out: Path, checkpointer: Checkpointer,
                primary: bool) -> tuple[int | None, dict[str, Any] | None]:
    """``(step to resume from, the saved run's config.json)`` for ``--resume`` (checked
    against this run), else ``(None, None)`` once ``out`` is known to hold no run that
    this one would silently replace."""
    if config.resume:
        resume_step = check_resume(config, out, checkpointer)
        return resume_step, saved_run(out, checkpointer, resume_step)
    if primary:  # the others do not look: process 0 may have begun writing
        existing = holds_run(out)
        if existing and not config.overwrite:
            raise FileExistsError(
                f"{out} already holds a run ({', '.join(existing)}); pass --resume to "
                "continue it, --overwrite to replace it, or choose another --out")
    return None, None
