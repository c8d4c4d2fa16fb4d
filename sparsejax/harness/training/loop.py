"""The training loop behind ``sparsejax train``: data, model, method, compiled steps,
periodic evaluation, JSON-lines metrics, checkpoints and exact resume.

Resume is exact: the checkpoint holds the whole :class:`~sparsejax.SparseState` (params,
masks, scores, optimizer state, PRNG key, batch statistics) and the data stream is keyed
by ``(seed, epoch)``, so a run killed at any moment and resumed with ``resume=True`` ends
with parameters bitwise identical to an uninterrupted run of the same configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from sparsejax.core.validation import check_writable_folder
from sparsejax.engine.parallel import join_processes, make_trainer
from sparsejax.harness.data import (
    DataPosition,
    shard_for_process,
    train_batches,
)
from sparsejax.harness.training.batch_norm import (
    needs_recalibration,
    recalibration_images,
    recalibrator,
)
from sparsejax.harness.training.config import KEEP_BEST, TrainConfig, build_method, check_config
from sparsejax.harness.training.evaluation import (
    classification_loss,
    evaluate,
    make_eval_step,
    measured_sparsity,
    model_apply_fn,
)
from sparsejax.harness.training.recipes import resolve_recipe
from sparsejax.harness.training.run_folder import (
    CONFIG_FILE,
    check_resume_data,
    check_start,
    clear_run,
    holds_run,
    jsonable,
    run_lock,
)
from sparsejax.harness.training.run_output import MetricsLog, NoLog, ProgressBar, result_record
from sparsejax.harness.training.setup import Run, prepare, prepare_run
from sparsejax.harness.training.stops import Guard, RunStopped
from sparsejax.io.checkpoint import Checkpointer, CheckpointError
from sparsejax.io.files import read_json, write_json
from sparsejax.methods import SparseState

__all__ = [
    "TrainConfig",
    "Run",
    "prepare",
    "classification_loss",
    "make_eval_step",
    "evaluate",
    "build_method",
    "model_apply_fn",
    "train",
    "check_config",
    "measured_sparsity",
]


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job and return (and write to ``OUT/result.json``) its result.

    Training fields left unset take the method's recipe (:func:`resolve_recipe`); the
    result holds the effective ``config`` and, in ``config_sources``, where each of those
    values came from."""
    started = time.time()
    config, sources = resolve_recipe(config)
    check_config(config)
    join_processes(config.parallel)
    out = Path(config.out or config.default_out())
    check_writable_folder(out, "--out")
    # a second run on the same --out fails here, at once; of several processes of one
    # run, only process 0 writes into --out (see _train_in), so only it holds the lock
    lock = run_lock(out) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train_in(config, sources, out, started)


def _train_in(config: TrainConfig, sources: dict[str, str], out: Path,
              started: float) -> dict[str, Any]:
    # Of several processes, process 0 alone writes config, metrics and result (every
    # process computes the same values); checkpoints are written by all of them together
    # (orbax's CheckpointManager), from the sharded trainer's global arrays. pmap's state
    # is a per-process replica, which no process-coordinated save takes: not saved.
    primary = jax.process_index() == 0
    checkpoints = jax.process_count() == 1 or config.parallel == "sharded"
    if config.resume and not checkpoints:
        raise ValueError(
            f"--resume with {jax.process_count()} processes and --parallel pmap: such runs "
            "write no checkpoints; run several processes with --parallel sharded")
    if not checkpoints and primary:
        print(f"{jax.process_count()} processes with --parallel pmap: no checkpoints are "
              "written (they need --parallel sharded)", file=sys.stderr)
    checkpointer = Checkpointer(out / "checkpoints", max_to_keep=config.keep_checkpoints,
                                async_save=True, best_metric=config.keep_best,
                                best_mode=KEEP_BEST.get(config.keep_best, "min"))
    resume_step, previous = check_start(config, out, checkpointer, primary)
    # check_config ran at the top of train
    run = prepare_run(config, abstract_state=resume_step is not None)
    dataset, model, method, state = run.dataset, run.model, run.method, run.state
    batches_per_epoch, total_steps = run.batches_per_epoch, run.total_steps
    data_fingerprint = dataset.fingerprint()  # saved with every checkpoint
    if resume_step is not None:
        check_resume_data(data_fingerprint, checkpointer, resume_step)
    if resume_step is not None and total_steps < resume_step:
        length = (f"--steps {config.steps}" if config.steps is not None
                  else f"--epochs {config.epochs} ({total_steps} steps)")
        raise ValueError(
            f"--resume: {length} ends before the checkpoint at step {resume_step} in "
            f"{checkpointer.directory}; pass a length of at least {resume_step} steps")
    if resume_step == total_steps and "result.json" in holds_run(out):
        # A finished run resumed as it was: nothing to train, and its result (with the
        # layout it ran on) stays as it is.
        checkpointer.close()
        print(f"the run in {out} is finished (step {resume_step} of {total_steps}): "
              "nothing to train, result.json unchanged", file=sys.stderr)
        return read_json(out / "result.json", "a sparsejax result")
    if config.overwrite and not config.resume and primary:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_steps = None if previous is None else previous.get(
        "total_steps", previous.get("steps"))
    start_step, skipped_before, last_saved = 0, 0, None
    # the device layout of every stretch of the run (a resume may change it): checkpoints
    # carry the history, result.json reports it
    layout = {"parallel": config.parallel, "processes": jax.process_count(),
              "devices": jax.device_count() if config.parallel != "none" else 1}
    layouts: list[dict[str, Any]] = []
    if resume_step is not None:
        start_step, state, metadata = checkpointer.restore(state)
        skipped_before = int(metadata.get("skipped_nonfinite_steps", 0))
        layouts = list(metadata.get("layouts", []))
        last_saved = start_step
        print(f"resumed from step {start_step} in {checkpointer.directory}", file=sys.stderr)
    elif config.resume:
        print(f"no checkpoint in {checkpointer.directory}; starting fresh", file=sys.stderr)
    layouts.append({"from_step": start_step, **layout})
    # An interrupt or a failed write from here on stops the run after closing what it
    # opened (the checkpointer last), naming the newest committed checkpoint (stops.py).
    guard = Guard(step=start_step, total_steps=total_steps,
                  checkpoint_dir=checkpointer.directory if checkpoints else None,
                  newest_checkpoint=lambda: checkpointer.latest_step(verify_checksums=False),
                  several_processes=jax.process_count() > 1)
    guard.add(checkpointer.close)  # async: training goes on while a checkpoint is written
    try:
        guard.check()
        # metrics.jsonl first: a damaged one that cannot be repaired leaves --out unchanged
        log = (MetricsLog(out / "metrics.jsonl", start_step, tensorboard=config.tensorboard)
               if primary else NoLog())
        guard.add(log.close)
        # OUT/config.json: what --resume checks a later run against (written atomically).
        if primary:
            write_json(out / CONFIG_FILE, {"config": jsonable(dataclasses.asdict(config)),
                                           "config_sources": sources,
                                           "total_steps": total_steps,
                                           "batches_per_epoch": batches_per_epoch})
        trainer = make_trainer(config.parallel, method, classification_loss(model),
                               skip_nonfinite=config.nonfinite == "skip")
        state = trainer.put_state(state)
        evaluate_state = _evaluator(run, config)
        progress = ProgressBar(config.progress and primary, total_steps, start_step)
        guard.add(progress.close)
        end = _train_steps(config, run, trainer, state, evaluate_state, _Stretch(
            start_step=start_step, checkpoints=checkpoints, fingerprint=data_fingerprint,
            skipped_before=skipped_before, layouts=layouts, last_saved=last_saved),
            guard, log, progress, checkpointer)
    except RunStopped:
        raise
    except (OSError, CheckpointError) as error:  # a full disk, a failed save
        raise guard.stopped(error) from error
    except BaseException:
        guard.close_quietly()
        raise
    guard.close()  # waits for the last checkpoint; its failure stops the run too

    state = trainer.get_state(end.state)
    last_eval, last_sparsity, skipped = end.last_eval, end.last_sparsity, end.skipped
    if not last_eval:
        last_eval, last_sparsity = evaluate_state(state)
    result = result_record(config, sources, total_steps, start_step, skipped_before + skipped,
                     layouts, last_eval, last_sparsity, started)
    if previous_steps is not None and previous_steps != total_steps:
        result["extended_from_steps"] = previous_steps  # the length the run began with
    failure = _nonfinite_failure(config, result, end.final_step_finite)
    result["failed"] = failure
    if primary:
        try:
            write_json(out / "result.json", jsonable(result))
        except OSError as error:
            raise guard.stopped(error) from error
    if failure is not None:
        raise FloatingPointError(f"{failure}; the facts are in {out / 'result.json'}")
    return result


def _evaluator(run: Run, config: TrainConfig) -> Any:
    """``state -> (metrics, measured sparsity)``: test metrics (and, with a validation
    split, ``validation_accuracy`` and ``validation_loss``) from one ``effective_params``;
    a relaxed method on batch norm with its batch-norm statistics recomputed for the
    binary mask (``config.bn_recalibration_batches``)."""
    eval_step = jax.jit(make_eval_step(run.model))
    effective_params = jax.jit(run.method.effective_params)
    recalibrate = (needs_recalibration(run.method, run.state.model_state)
                   and config.bn_recalibration_batches > 0)
    if recalibrate:  # fixed batches: every evaluation of the run sees the same ones
        images = recalibration_images(run.dataset.train_images,
                                      config.bn_recalibration_batches, config.batch_size,
                                      config.seed)
        recalibrated_batch_stats = recalibrator(run.model)

    def evaluate_state(state: SparseState) -> tuple[dict[str, float], float]:
        params = effective_params(state)
        model_state = state.model_state
        if recalibrate:  # batch-norm statistics of the binary mask, not of the relaxed net
            model_state = recalibrated_batch_stats(params, model_state, images)
        metrics = evaluate(eval_step, (params, model_state), run.dataset)
        if run.validation is not None:
            held = evaluate(eval_step, (params, model_state), run.validation)
            metrics.update(validation_accuracy=held["accuracy"], validation_loss=held["loss"])
        return metrics, measured_sparsity(params)

    return evaluate_state


class _Stretch(NamedTuple):
    """Where this stretch of a run starts and what its checkpoints record."""

    start_step: int
    checkpoints: bool  # whether this run writes checkpoints
    fingerprint: Any  # the data's, saved with every checkpoint
    skipped_before: int  # non-finite steps skipped before start_step
    layouts: list[dict[str, Any]]  # the device layout of every stretch so far
    last_saved: int | None


class _LoopEnd(NamedTuple):
    state: Any  # the trainer's state after the last step
    skipped: int  # non-finite steps skipped in this stretch
    final_step_finite: bool
    last_eval: dict[str, float]
    last_sparsity: float


def _train_steps(config: TrainConfig, run: Run, trainer: Any, state: Any,
                 evaluate_state: Any, stretch: _Stretch, guard: Guard, log: Any,
                 progress: ProgressBar, checkpointer: Checkpointer) -> _LoopEnd:
    """The steps from ``stretch.start_step + 1`` to the end: train, and at their
    intervals log, evaluate and checkpoint; a SIGINT or SIGTERM stops between steps."""
    start_step, last_saved = stretch.start_step, stretch.last_saved
    batches_per_epoch, total_steps = run.batches_per_epoch, run.total_steps
    eval_every = config.eval_every or batches_per_epoch
    checkpoint_every = config.checkpoint_every or batches_per_epoch
    stream = train_batches(run.dataset, config.batch_size, config.seed,
                           DataPosition.from_step(start_step, batches_per_epoch))
    pending: list[dict[str, jax.Array]] = []
    window_start, skipped = time.time(), 0
    final_step_finite = True
    last_eval: dict[str, float] = {}
    last_sparsity = 0.0
    for step in range(start_step + 1, total_steps + 1):
        guard.check()  # a SIGINT or SIGTERM stops the run here, between two steps
        _, batch = next(stream)
        if jax.process_count() > 1:
            batch = shard_for_process(batch, jax.process_index(), jax.process_count())
        state, metrics = trainer.step(state, trainer.put_batch(batch))
        guard.step = step
        pending.append(metrics)
        log_now = step % config.log_every == 0 or step == total_steps
        save_now = step % checkpoint_every == 0 or step == total_steps
        # keep-best ranks every checkpoint by a metric of its own state
        eval_now = (step % eval_every == 0 or step == total_steps
                    or (save_now and config.keep_best is not None))
        if not (log_now or eval_now or save_now):
            continue
        # Every pending step is checked before anything is logged or saved, so a
        # checkpoint never holds a state that a NaN has reached.
        record = _summarise(pending, step, window_start, config.nonfinite, last_saved)
        skipped += record.pop("skipped", 0)
        final_step_finite = record.pop("last_finite")
        pending, window_start = [], time.time()
        logical = trainer.get_state(state)
        if eval_now:
            last_eval, last_sparsity = evaluate_state(logical)
            record.update({"test_accuracy": last_eval["accuracy"],
                           "test_loss": last_eval["loss"], "sparsity": last_sparsity})
            record.update({k: v for k, v in last_eval.items()
                           if k.startswith("validation_")})
        if log_now or eval_now:
            log.write(record)
            progress.update(step, record)
        if save_now and stretch.checkpoints:
            checkpointer.save(step, logical, {
                "position": DataPosition.from_step(step, batches_per_epoch)._asdict(),
                "config": dataclasses.asdict(config),
                "data": stretch.fingerprint,
                "skipped_nonfinite_steps": stretch.skipped_before + skipped,
                "layouts": stretch.layouts},
                **({} if config.keep_best is None
                   else {"metrics": {config.keep_best: last_eval[config.keep_best]}}))
            last_saved = step
    return _LoopEnd(state, skipped, final_step_finite, last_eval, last_sparsity)


def _nonfinite_failure(config: TrainConfig, result: dict[str, Any],
                       final_step_finite: bool) -> str | None:
    """Why a ``--nonfinite skip`` run failed although it finished, or ``None``."""
    if config.nonfinite != "skip":
        return None
    steps, skipped = result["steps"], result["skipped_nonfinite_steps"]
    if not final_step_finite:
        return (f"the run ended with a non-finite training loss: its last step ({steps}) "
                f"was NaN or inf and skipped ({skipped} of {steps} steps skipped)")
    if not math.isfinite(result["test_loss"]):
        return f"the run ended with a non-finite test loss ({result['test_loss']})"
    if skipped > config.max_skipped_fraction * steps:
        return (f"{skipped} of {steps} steps ({skipped / steps:.0%}) had a NaN or inf loss or "
                f"gradient and were skipped, more than --max-skipped-fraction "
                f"{config.max_skipped_fraction:g}")
    return None


def _summarise(pending: list[dict[str, jax.Array]], step: int, window_start: float,
               nonfinite: str = "error", last_saved: int | None = None) -> dict[str, Any]:
    """Mean of the pending per-step metrics over the finite steps. A non-finite step is
    an error naming the step, or (``nonfinite='skip'``, where the step left the state
    untouched) counted in ``record['skipped']``."""
    host = jax.device_get(pending)
    finite = [bool(m["finite"]) for m in host]
    if not all(finite) and nonfinite != "skip":
        bad = step - len(finite) + 1 + finite.index(False)
        kept = ("no checkpoint was written before it" if last_saved is None
                else f"the last good checkpoint, step {last_saved}, is kept")
        raise FloatingPointError(
            f"the training loss or a gradient became NaN or inf at step {bad}; lower --lr, "
            f"check the data, or pass --nonfinite skip ({kept})"
        )
    record: dict[str, Any] = {"step": step}
    good = [m for m, ok in zip(host, finite, strict=True) if ok]
    for key in host[0]:
        if key != "finite" and good:
            record[key] = float(np.mean([m[key] for m in good]))
    record["steps_per_sec"] = len(host) / max(time.time() - window_start, 1e-9)
    if not all(finite):
        record["skipped"] = finite.count(False)
    record["last_finite"] = finite[-1]
    return record
