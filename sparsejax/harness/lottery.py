"""The ``sparsejax lottery`` driver: iterative magnitude pruning (IMP) with rewinding, its
controls, and linear-mode-connectivity (instability) analysis.

Procedure (Frankle & Carbin 2019; Frankle et al. 2020). Record the rewind point: ``w_0``,
or for late rewinding the whole training state at step ``k`` (``--rewind 500it`` or
``2ep``). Round 0 trains the dense network. Each later round prunes a fraction of the
surviving weights of the previous round's trained ticket by ``|w|`` (layer-wise or
global; the output layer at its own rate or dense), resets the survivors to the rewind
point and trains again from step ``k`` to the end, with the same learning-rate schedule,
optimizer state and data order as the uninterrupted run (the state at ``k`` is restored
whole, with the new masks; pruned weights are zero and stay zero). Controls branch off
each round with the round's mask: ``reinit`` (the same mask on a fresh random
initialisation) and ``random_mask`` (a random mask with the same kept count in every
layer, on the rewind weights). With a sparsity ``pattern`` (``--pattern 2:4``,
``block:4``, ``channel``) every round prunes by magnitude within it and the random mask
keeps the same counts per group (the rules: :mod:`sparsejax.harness.lottery_masks`).

Each run lives in ``OUT_ROOT/<model>_<dataset>_<hash>``, the hash taken over the
hyperparameters that differ from :class:`LotteryConfig`'s defaults (and over none of
``rounds``, ``controls``, ``out_root``, which do not change any round's result), so a
rerun finds every finished round; ``--out FOLDER`` (``LotteryConfig.out``) names the run
folder itself instead, as ``sparsejax train --out`` does. Every branch of every round
checkpoints once per epoch (atomic, verified); a killed run resumes at the round and step
it reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.core._tree import leaf_paths
from sparsejax.core.distributions import select_masks
from sparsejax.core.masks import (
    Prunable,
    default_prunable,
    dense_masks,
    format_sparsity_report,
    sparsity_report,
)
from sparsejax.core.patterns import as_pattern
from sparsejax.core.transforms import zero_masked
from sparsejax.core.validation import check_int, check_writable_folder, is_int
from sparsejax.engine.step import make_train_step
from sparsejax.harness.data import Dataset, epoch_permutation, load_dataset, steps_per_epoch
from sparsejax.harness.lottery_masks import (
    check_lottery_pattern,
    pattern_imp_masks,
    pattern_random_mask,
    round_counts,
)
from sparsejax.harness.models import get_model, init_model
from sparsejax.harness.provenance import provenance
from sparsejax.harness.training.loop import classification_loss, make_eval_step
from sparsejax.harness.training.optim import make_optimizer
from sparsejax.io.checkpoint import Checkpointer
from sparsejax.io.files import read_json, write_json
from sparsejax.methods.base import Method, SparseState
from sparsejax.methods.fixed import fixed_mask
from sparsejax.methods.pruning import exclude_pruned, magnitude_scores

__all__ = [
    "LotteryConfig",
    "CONTROLS",
    "parse_step",
    "config_hash",
    "run_folder",
    "round_counts",
    "imp_masks",
    "Trainer",
    "run_lottery",
    "interpolation_errors",
    "error_barrier",
    "instability",
    "add_commands",
]

PyTree = Any
CONTROLS = ("reinit", "random_mask")


def parse_step(text: str | int, batches_per_epoch: int) -> int:
    """A step count from ``'500it'``, ``'2ep'`` (epochs of ``batches_per_epoch``) or an int.

    >>> parse_step("500it", 100), parse_step("2ep", 100), parse_step(7, 100)
    (500, 200, 7)
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(it|ep)?\s*", str(text))
        if not match:
            raise ValueError(f"a step is written like '500it' or '2ep', got {text!r}")
        value = int(match.group(1)) * (batches_per_epoch if match.group(2) == "ep" else 1)
    if value < 0:
        raise ValueError(f"a step must be >= 0, got {text!r}")
    return value


@dataclasses.dataclass
class LotteryConfig:
    """An IMP run. The defaults are the paper's LeNet-300-100 setup (Adam 1.2e-3, batch
    60, layer-wise pruning of 20% per round, 10% for the output layer), except the length:
    give ``epochs`` or ``steps`` per round.

    Attributes:
      prune_fraction: fraction of the surviving prunable weights removed each round.
      output_fraction: the same for the output layer (``output_layer``); ``None``: prune
        it like the others; ``0``: leave it dense.
      distribution: ``'uniform'`` (each layer loses ``prune_fraction`` of its survivors)
        or ``'global'`` (one magnitude threshold over the pooled layers).
      rewind: the rewind step, ``'0'`` (to init), ``'500it'`` or ``'2ep'``.
      controls: branches trained each round beside the ticket, from :data:`CONTROLS`.
      control_rounds: the rounds that get the controls (``None``: every round >= 1);
        each must lie in ``[1, rounds]``.
      pattern: the sparsity pattern each round prunes within (:mod:`sparsejax.core.patterns`;
        rules in :mod:`sparsejax.harness.lottery_masks`); hashed only when not ``'unstructured'``.
      out: the run folder itself (``None``: ``out_root/<model>_<dataset>_<hash>``, see
        :func:`run_folder`).
    """

    model: str = "lenet300"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    rounds: int = 18
    prune_fraction: float = 0.2
    output_fraction: float | None = 0.1
    output_layer: str = "head"
    distribution: str = "uniform"
    rewind: str = "0it"
    controls: tuple[str, ...] = ("reinit",)
    control_rounds: tuple[int, ...] | None = None
    pattern: str = "unstructured"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 60
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    seed: int = 0
    out_root: str = "runs/lottery"
    out: str | None = None

    def check(self) -> None:
        """Raise ``ValueError`` for inconsistent settings."""
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps (per round)")
        if not 0 < self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must lie in (0, 1), got {self.prune_fraction}")
        if self.output_fraction is not None and not 0 <= self.output_fraction < 1:
            raise ValueError(f"output_fraction must lie in [0, 1), got {self.output_fraction}")
        if self.distribution not in ("uniform", "global"):
            raise ValueError("distribution must be 'uniform' (layer-wise) or 'global', got "
                             f"{self.distribution!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        outside = [r for r in self.control_rounds or () if not 1 <= r <= self.rounds]
        if outside:  # they used to run no control, exit code 0
            valid = (f"rounds in [1, {self.rounds}]" if self.rounds else
                     "no round (round 0, the dense one, gets no controls)")
            raise ValueError(
                f"--control-rounds {' '.join(map(str, outside))} names round(s) this run does "
                f"not have: --rounds {self.rounds} trains rounds 1 to {self.rounds} after the "
                f"dense round 0, so --control-rounds takes {valid}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}; known: {', '.join(CONTROLS)}")
        check_lottery_pattern(self.pattern, self.prune_fraction, self.output_fraction,
                              self.distribution, self.rounds)


_UNHASHED = ("rounds", "controls", "control_rounds", "out_root", "out", "data_dir")


def config_hash(config: LotteryConfig) -> str:
    """The folder name of a run: model, dataset and a hash of its non-default settings.

    >>> config_hash(LotteryConfig(epochs=2)) == config_hash(LotteryConfig(epochs=2, rounds=3))
    True
    >>> config_hash(LotteryConfig(epochs=2)) == config_hash(LotteryConfig(epochs=3))
    False
    """
    defaults = dataclasses.asdict(LotteryConfig())
    changed = {k: v for k, v in dataclasses.asdict(config).items()
               if k not in _UNHASHED and v != defaults[k]}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.model}_{config.dataset}_{digest}"


def run_folder(config: LotteryConfig) -> Path:
    """The folder of a run: ``config.out`` when given, else
    ``config.out_root/<model>_<dataset>_<hash>``."""
    if config.out is not None:
        return Path(config.out)
    return Path(config.out_root) / config_hash(config)


def _check_out(root: Path, config: LotteryConfig) -> None:
    """Raise ``ValueError`` naming the run folder when it cannot be made or written (a
    regular file in its path: ``[Errno 17] File exists`` before)."""
    check_writable_folder(root, "--out" if config.out is not None else "--out-root")


def _check_same_run(root: Path, config: LotteryConfig) -> None:
    """Raise ``ValueError`` when ``root`` already holds a lottery run whose results the
    settings of ``config`` would not reproduce (an ``--out`` folder reused with other
    hyperparameters; the hashed folders never collide)."""
    path = root / "config.json"
    if not path.exists():
        return
    stored = read_json(path, "a lottery run's settings")
    try:
        fields = {f.name for f in dataclasses.fields(LotteryConfig)}
        previous = LotteryConfig(**{k: v for k, v in stored.items() if k in fields})
    except (ValueError, TypeError):
        return
    if config_hash(previous) != config_hash(config):
        changed = sorted(k for k in dataclasses.asdict(config)
                         if k not in _UNHASHED and getattr(previous, k) != getattr(config, k))
        raise ValueError(f"{root} holds a lottery run with other settings ({', '.join(changed)}"
                         "); give another --out, or the same settings to continue it")


# --------------------------------------------------------------------------- pruning


def _output_filter(config: LotteryConfig) -> tuple[Prunable, str | None]:
    """The prunable filter and the output layer's regex (``None`` when it is dense or
    pruned like the others)."""
    pattern = rf"^{re.escape(config.output_layer)}/.*"
    if config.output_fraction == 0:
        def prunable(path: str, leaf: Any) -> bool:
            return default_prunable(path, leaf) and not re.fullmatch(pattern, path)
        return prunable, None
    return default_prunable, (pattern if config.output_fraction is not None else None)


def imp_masks(config: LotteryConfig, params: PyTree, masks: PyTree, round_index: int
              ) -> PyTree:
    """The masks of ``round_index`` (>= 1): prune the smallest ``|w|`` among the survivors
    ``masks`` of the trained ``params`` down to the kept counts of that round.

    >>> import jax.numpy as jnp
    >>> cfg = LotteryConfig(epochs=1, prune_fraction=0.5, output_fraction=None)
    >>> p = {"fc": {"kernel": jnp.array([[1.0, -4.0], [3.0, 2.0]])}}
    >>> m = {"fc": {"kernel": jnp.ones((2, 2), bool)}}
    >>> imp_masks(cfg, p, m, 1)["fc"]["kernel"]
    Array([[False,  True],
           [ True, False]], dtype=bool)
    """
    prunable, output = _output_filter(config)
    if not as_pattern(config.pattern).ranks_globally:
        return pattern_imp_masks(
            as_pattern(config.pattern), params, masks, round_index, prunable,
            lambda p: config.output_fraction if output and re.fullmatch(output, p)
            else config.prune_fraction)
    paths = leaf_paths(params)
    leaves = jax.tree_util.tree_leaves(params)
    sizes = {p: int(np.size(leaf)) for p, leaf in zip(paths, leaves, strict=True)
             if prunable(p, leaf)}
    is_output = {p: bool(output and re.fullmatch(output, p)) for p in sizes}
    overrides: dict[str, float] = {}
    fixed_kept = 0
    for p, n in sizes.items():
        if is_output[p]:
            count = round_counts(n, config.output_fraction, round_index)
        elif config.distribution == "uniform":
            count = round_counts(n, config.prune_fraction, round_index)
        else:
            continue
        overrides[f"^{re.escape(p)}$"] = count / n
        fixed_kept += count
    pooled = sum(n for p, n in sizes.items() if f"^{re.escape(p)}$" not in overrides)
    kept = round_counts(pooled, config.prune_fraction, round_index) + fixed_kept
    total = sum(sizes.values())
    density = kept / total if total else 1.0
    scores = exclude_pruned(magnitude_scores(params), masks)
    return select_masks(scores, density, "global", prunable=prunable, overrides=overrides)


def _same_counts_random_mask(masks: PyTree, rng: jax.Array, prunable: Prunable,
                             pattern: str = "unstructured") -> PyTree:
    """A random mask with the kept count of ``masks`` in every prunable leaf (and in
    every group of a structured ``pattern``)."""
    return pattern_random_mask(as_pattern(pattern), masks, rng, prunable)


# --------------------------------------------------------------------------- training


class Trainer:
    """Fast training of a masked model on an in-memory dataset: the whole dataset sits on
    the device and each stretch of steps runs as one compiled ``lax.scan``. The batch of
    step ``t`` is the one :func:`sparsejax.harness.data.train_batches` yields at step ``t`` (the
    permutation of epoch ``t // batches_per_epoch`` under ``data_seed``), so a run
    continued from step ``k`` sees the same data order as an uninterrupted one.
    """

    def __init__(self, config: LotteryConfig, dataset: Dataset | None = None) -> None:
        config.check()
        self.config = config
        self.dataset = dataset or load_dataset(config.dataset, config.data_dir,
                                               seed=config.seed)
        n = len(self.dataset.train_labels)
        self.batches_per_epoch = steps_per_epoch(n, config.batch_size)
        self.total_steps = (config.steps if config.steps is not None
                            else config.epochs * self.batches_per_epoch)
        self.rewind_step = parse_step(config.rewind, self.batches_per_epoch)
        if self.rewind_step >= self.total_steps:
            raise ValueError(f"rewind step {self.rewind_step} must come before the end of "
                             f"training ({self.total_steps} steps)")
        self.model = get_model(config.model, self.dataset.num_classes)
        optimizer = make_optimizer(config.optimizer, config.lr, total_steps=self.total_steps,
                                   momentum=config.momentum,
                                   weight_decay=config.weight_decay,
                                   lr_schedule=config.lr_schedule)
        # Each round's masks replace these dense ones in the state (see imp_masks).
        self.method: Method = fixed_mask(optimizer, lambda p, r, s, c: dense_masks(p),
                                         name="lottery")
        self.train_images = jnp.asarray(self.dataset.train_images)
        self.train_labels = jnp.asarray(self.dataset.train_labels)
        step_fn = make_train_step(self.method, classification_loss(self.model))

        def run_chunk(state: SparseState, order: jax.Array) -> tuple[SparseState, jax.Array]:
            def body(st: SparseState, index: jax.Array):
                batch = {"image": self.train_images[index], "label": self.train_labels[index]}
                st, metrics = step_fn(st, batch)
                return st, metrics["finite"]
            state, finite = lax.scan(body, state, order)
            return state, jnp.all(finite)

        self._run_chunk = jax.jit(run_chunk)
        eval_step = make_eval_step(self.model)
        test = {"image": jnp.asarray(self.dataset.test_images),
                "label": jnp.asarray(self.dataset.test_labels),
                "weight": jnp.ones(len(self.dataset.test_labels), jnp.float32)}
        self._eval = jax.jit(lambda state: eval_step(
            (self.method.effective_params(state), state.model_state), test))

    def init_params(self, key: jax.Array) -> tuple[PyTree, PyTree]:
        """Fresh ``(params, model_state)`` of the model."""
        return init_model(self.model, key, (1, *self.dataset.input_shape))

    def initial_state(self) -> SparseState:
        """The dense state at step 0 (``w_0`` from ``seed``)."""
        init_key, method_key = jax.random.split(jax.random.PRNGKey(self.config.seed))
        params, model_state = self.init_params(init_key)
        return jax.jit(self.method.init)(params, method_key, model_state)

    def order(self, start: int, stop: int, data_seed: int) -> np.ndarray:
        """Example indices ``[stop - start, batch_size]`` of steps ``start .. stop - 1``."""
        bs, bpe = self.config.batch_size, self.batches_per_epoch
        rows = []
        for step in range(start, stop):
            epoch, batch = divmod(step, bpe)
            if not rows or batch == 0 or step == start:
                perm = epoch_permutation(data_seed, epoch, len(self.dataset.train_labels))
            rows.append(perm[batch * bs:(batch + 1) * bs])
        return np.asarray(rows, np.int32)

    def train(self, state: SparseState, stop: int, data_seed: int | None = None,
              on_boundary: Callable[[SparseState], None] | None = None,
              boundaries: Sequence[int] = ()) -> SparseState:
        """Train from ``state.step`` to ``stop``; ``on_boundary(state)`` runs at every epoch
        end and at each step of ``boundaries`` (e.g. to checkpoint)."""
        seed = self.config.seed if data_seed is None else data_seed
        step = int(state.step)
        bpe = self.batches_per_epoch
        marks = sorted({*range(bpe, stop, bpe), *[b for b in boundaries if step < b < stop],
                        stop})
        for mark in marks:
            if mark <= step:
                continue
            state, finite = self._run_chunk(state, jnp.asarray(self.order(step, mark, seed)))
            if not bool(finite):
                raise FloatingPointError(f"the training loss became NaN or inf between steps "
                                         f"{step} and {mark}; lower the learning rate")
            step = mark
            if on_boundary is not None:
                on_boundary(state)
        return state

    def accuracy(self, state: SparseState) -> float:
        """Test accuracy of the state's effective (masked) params."""
        sums = jax.device_get(self._eval(state))
        return float(sums["correct"] / sums["count"])


# --------------------------------------------------------------------------- driver


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_json(path, payload)  # atomic, and no .tmp left when it fails


def _branch(trainer: Trainer, folder: Path, start: SparseState, *,
            data_seed: int | None = None, rewind_to: Path | None = None,
            extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], SparseState]:
    """Train one branch from ``start`` to the end (resuming from its checkpoints) and
    return ``(result, final state)``; a finished branch is read back, not retrained."""
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "result.json"
    with Checkpointer(folder / "checkpoints", max_to_keep=1) as checkpointer:
        if result_path.exists() and checkpointer.latest_step() == trainer.total_steps:
            _, state, _ = checkpointer.restore(start)
            return read_json(result_path, "a lottery branch's result"), state
        state = start
        if checkpointer.latest_step() is not None:
            _, state, _ = checkpointer.restore(start)
        started = time.time()
        rewind_ckpt = Checkpointer(rewind_to, max_to_keep=1) if rewind_to else None
        curve: list[tuple[int, float]] = []

        def boundary(st: SparseState) -> None:
            step = int(st.step)
            if rewind_ckpt is not None and step == trainer.rewind_step:
                rewind_ckpt.save(step, st)
            if step % trainer.batches_per_epoch == 0 or step == trainer.total_steps:
                curve.append((step, trainer.accuracy(st)))
                checkpointer.save(step, st)

        try:
            state = trainer.train(state, trainer.total_steps, data_seed, boundary,
                                  boundaries=[trainer.rewind_step] if rewind_ckpt else [])
        finally:
            if rewind_ckpt is not None:
                rewind_ckpt.close()
        effective = jax.device_get(trainer.method.effective_params(state))
        rows = sparsity_report(effective)
        result = {
            "test_accuracy": trainer.accuracy(state),
            "density": rows[-1].density,
            "sparsity": rows[-1].sparsity,
            "layers": [{"path": r.path, "kept": r.kept, "size": r.size, "density": r.density}
                       for r in rows[:-1] if r.prunable],
            "report": format_sparsity_report(rows),
            "curve": curve,
            "seconds": time.time() - started,
            "provenance": provenance(),
            **(extra or {}),
        }
        _write_json(result_path, result)
        return result, state


def run_lottery(config: LotteryConfig, *, verbose: bool = True,
                trainer: Trainer | None = None) -> dict[str, Any]:
    """Run (or resume, or read back) IMP with rewinding; returns the per-round results and
    writes ``summary.json`` in the run folder."""
    root = run_folder(config)
    _check_out(root, config)
    _check_same_run(root, config)
    trainer = trainer or Trainer(config)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "config.json", {k: v for k, v in dataclasses.asdict(config).items()})
    prunable, _ = _output_filter(config)
    init_state = trainer.initial_state()
    k = trainer.rewind_step
    rounds: list[dict[str, Any]] = []

    # Round 0: dense; records the rewind point when it passes step k.
    rewind_dir = root / "rewind"
    result, trained = _branch(trainer, root / "round_00" / "ticket", init_state,
                              rewind_to=rewind_dir if k else None, extra={"round": 0})
    if k:
        with Checkpointer(rewind_dir, max_to_keep=1) as ckpt:
            _, rewind_state, _ = ckpt.restore(init_state)
    else:
        rewind_state = init_state
    rounds.append({"round": 0, "ticket": result})
    if verbose:
        _print_round(0, result, {})
    masks = init_state.masks
    base_key = jax.random.PRNGKey(config.seed)
    for r in range(1, config.rounds + 1):
        masks = jax.device_get(imp_masks(config, trained.params, masks, r))
        start = rewind_state.replace(params=zero_masked(rewind_state.params, masks),
                                     masks=masks)
        folder = root / f"round_{r:02d}"
        result, trained = _branch(trainer, folder / "ticket", start, extra={"round": r})
        entry: dict[str, Any] = {"round": r, "ticket": result}
        controls: dict[str, Any] = {}
        wanted = config.control_rounds is None or r in config.control_rounds
        for control in config.controls if wanted else ():
            key = jax.random.fold_in(jax.random.fold_in(base_key, 0xC0), r)
            if control == "reinit":
                fresh, _ = trainer.init_params(key)
                branch_start = start.replace(params=zero_masked(fresh, masks))
            else:
                rmasks = _same_counts_random_mask(masks, key, prunable, config.pattern)
                branch_start = rewind_state.replace(
                    params=zero_masked(rewind_state.params, rmasks), masks=rmasks)
            controls[control], _ = _branch(trainer, folder / control, branch_start,
                                           extra={"round": r})
        entry.update(controls)
        rounds.append(entry)
        if verbose:
            _print_round(r, result, controls)
    summary = {"config": dataclasses.asdict(config), "folder": str(root),
               "rewind_step": k, "total_steps": trainer.total_steps,
               "rounds": [{"round": e["round"], "density": e["ticket"]["density"],
                           "ticket": e["ticket"]["test_accuracy"],
                           **{c: e[c]["test_accuracy"] for c in config.controls if c in e}}
                          for e in rounds],
               "provenance": provenance()}
    _write_json(root / "summary.json", summary)
    return summary


def _print_round(r: int, result: dict[str, Any], controls: dict[str, Any]) -> None:
    extra = "".join(f"  {c} {v['test_accuracy']:.4f}" for c, v in controls.items())
    print(f"round {r:2d}: {100 * result['density']:6.2f}% remaining  "
          f"ticket {result['test_accuracy']:.4f}{extra}", file=sys.stderr)
    print(result["report"], file=sys.stderr)


# --------------------------------------------------------------------------- instability


def interpolation_errors(trainer: Trainer, state_a: SparseState, state_b: SparseState,
                         alphas: Sequence[float]) -> list[float]:
    """Test error of ``(1 - a) * w_A + a * w_B`` (under A's masks) for each ``a``."""
    errors = []
    for a in alphas:
        params = jax.tree_util.tree_map(lambda x, y, a=a: (1 - a) * x + a * y,
                                        state_a.params, state_b.params)
        errors.append(1.0 - trainer.accuracy(state_a.replace(params=params)))
    return errors


def error_barrier(errors: Sequence[float]) -> float:
    """Instability: the largest error along the path above the mean of its two ends.

    >>> round(error_barrier([0.02, 0.10, 0.04]), 6)
    0.07
    """
    return float(max(errors) - 0.5 * (errors[0] + errors[-1]))


def _check_round_was_run(root: Path, round_index: int) -> None:
    """Raise ``ValueError`` unless round ``round_index`` (>= 1) has finished in ``root``
    (round 0, the dense run, is trained on demand)."""
    if not isinstance(round_index, int) or round_index < 0:
        raise ValueError(f"--round must be an integer >= 0, got {round_index!r}")
    if round_index == 0 or (root / f"round_{round_index:02d}" / "ticket" / "result.json").exists():
        return
    finished = sorted(int(p.parent.parent.name.removeprefix("round_"))
                      for p in root.glob("round_*/ticket/result.json"))
    raise ValueError(f"--round {round_index} was not run: {root} holds the finished "
                     f"rounds {finished}; run "
                     f"'sparsejax lottery --rounds {round_index}' with the same options first")


def _check_instability_options(data_seeds: Sequence[int], num_alphas: int) -> None:
    """Raise ``ValueError`` for ``--data-seeds`` that are not two different seeds or an
    ``--alphas`` that cannot hold both ends of the line."""
    seeds = list(data_seeds)
    if len(seeds) != 2:
        raise ValueError(f"--data-seeds takes two seeds, got {len(seeds)}")
    for seed in seeds:
        check_int(seed, "--data-seeds", minimum=0, maximum=2**32 - 1)
    if seeds[0] == seeds[1]:
        raise ValueError(
            f"--data-seeds {seeds[0]} {seeds[1]} are equal: both copies would see the same "
            "data order and end identical, so the barrier between them would be 0 and "
            "measure nothing; give two different seeds (default 101 102)")
    if not is_int(num_alphas) or num_alphas < 2:
        raise ValueError(
            f"--alphas must be an integer >= 2 (the points evaluated on the line between the "
            f"two copies, both ends included; default 11), got {num_alphas!r}")


def instability(config: LotteryConfig, round_index: int = 0, *, data_seeds: Sequence[int] = (
        101, 102), num_alphas: int = 11, trainer: Trainer | None = None) -> dict[str, Any]:
    """Linear mode connectivity at the config's rewind step: two copies of the round's
    network (masks of ``round_index``, which must be finished) trained from the rewind
    point to the end with the data orders of ``data_seeds``, and the test error along the
    straight line between them. Results are cached in the run folder.

    Raises ``ValueError`` for equal ``data_seeds`` (two identical copies: a barrier of 0
    that measures nothing) and for ``num_alphas`` below 2 (the line's two ends)."""
    _check_instability_options(data_seeds, num_alphas)
    root = run_folder(config)
    _check_out(root, config)
    _check_same_run(root, config)
    _check_round_was_run(root, round_index)
    trainer = trainer or Trainer(config)
    folder = root / "instability" / f"round_{round_index:02d}_seeds_{data_seeds[0]}_" \
                                    f"{data_seeds[1]}"
    result_path = folder / "result.json"
    if result_path.exists():
        return read_json(result_path, "an instability result")
    init_state = trainer.initial_state()
    k = trainer.rewind_step
    if round_index == 0 and not (root / "round_00" / "ticket" / "result.json").exists():
        run_lottery(dataclasses.replace(config, rounds=0, controls=()), verbose=False,
                    trainer=trainer)
    masks = init_state.masks
    if round_index:
        with Checkpointer(root / f"round_{round_index:02d}" / "ticket" / "checkpoints") as c:
            _, ticket, _ = c.restore(init_state)
        masks = jax.device_get(ticket.masks)
    if k:
        with Checkpointer(root / "rewind", max_to_keep=1) as ckpt:
            _, rewind_state, _ = ckpt.restore(init_state)
    else:
        rewind_state = init_state
    start = rewind_state.replace(params=zero_masked(rewind_state.params, masks), masks=masks)
    copies = [_branch(trainer, folder / f"copy_{s}", start, data_seed=s)[1] for s in data_seeds]
    alphas = [i / (num_alphas - 1) for i in range(num_alphas)]
    errors = interpolation_errors(trainer, copies[0], copies[1], alphas)
    density = float(sparsity_report(jax.device_get(
        trainer.method.effective_params(copies[0])))[-1].density)
    result = {"round": round_index, "rewind_step": k, "density": density,
              "data_seeds": list(data_seeds), "alphas": alphas, "errors": errors,
              "barrier": error_barrier(errors), "config": dataclasses.asdict(config),
              "provenance": provenance()}
    _write_json(result_path, result)
    return result


# --------------------------------------------------------------------------- CLI


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    d = LotteryConfig()
    parser.add_argument("--model", default=d.model, help="the model, as in sparsejax train")
    parser.add_argument("--dataset", default=d.dataset, help="the dataset, as in sparsejax train")
    parser.add_argument("--data-dir", default=None, help="folder with the dataset")
    parser.add_argument("--rounds", type=int, default=d.rounds,
                        help="pruning rounds after the dense round 0")
    parser.add_argument("--prune-fraction", type=float, default=d.prune_fraction,
                        help="fraction of surviving weights removed per round")
    parser.add_argument("--output-fraction", default=str(d.output_fraction),
                        help="the output layer's fraction per round; 'same' or 0 (dense)")
    parser.add_argument("--output-layer", default=d.output_layer,
                        help="name (path prefix) of the output layer, for --output-fraction")
    parser.add_argument("--distribution", default=d.distribution, choices=("uniform", "global"),
                        help="prune each layer alike (uniform) or by one global threshold")
    parser.add_argument("--rewind", default=d.rewind, help="rewind step: 0, 500it or 2ep")
    parser.add_argument("--controls", default=",".join(d.controls),
                        help=f"comma-separated, from: {', '.join(CONTROLS)} (or 'none')")
    parser.add_argument("--control-rounds", type=int, nargs="*", default=None,
                        help="rounds that get the controls, each in [1, --rounds] "
                             "(default: all)")
    parser.add_argument("--pattern", default=d.pattern,
                        help="sparsity pattern of every round: unstructured, N:M (the "
                             "rounds step N down to it), block:B or channel")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=int, default=None, help="epochs per round")
    length.add_argument("--steps", type=int, default=None, help="steps per round")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="examples per training step")
    parser.add_argument("--optimizer", default=d.optimizer, help="sgd, nesterov or adam")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=d.momentum,
                        help="momentum of sgd and nesterov")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay,
                        help="L2 weight decay")
    parser.add_argument("--lr-schedule", default=d.lr_schedule, choices=("constant", "cosine"),
                        help="learning-rate schedule of each round")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the weights, data order and controls")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help="the run folder (as in sparsejax train); default: "
                            "OUT_ROOT/<model>_<dataset>_<hash of the settings>")
    where.add_argument("--out-root", default=d.out_root,
                       help="folder of the runs, one subfolder per config, when --out is "
                            f"not given (default {d.out_root})")


def _config_from_args(args: argparse.Namespace) -> LotteryConfig:
    output = args.output_fraction
    controls = () if args.controls in ("", "none") else tuple(args.controls.split(","))
    config = LotteryConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, rounds=args.rounds,
        prune_fraction=args.prune_fraction,
        output_fraction=None if output in ("same", "None") else float(output),
        output_layer=args.output_layer, distribution=args.distribution, rewind=args.rewind,
        controls=controls, control_rounds=None if args.control_rounds is None
        else tuple(args.control_rounds), pattern=str(as_pattern(args.pattern)),
        epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, seed=args.seed,
        out_root=args.out_root, out=args.out)
    config.check()
    return config


def _lottery_command(args: argparse.Namespace) -> int:
    summary = run_lottery(_config_from_args(args))
    print(json.dumps(summary["rounds"], indent=1))
    print(f"results in {summary['folder']}")
    return 0


def _instability_command(args: argparse.Namespace) -> int:
    result = instability(_config_from_args(args), args.round,
                         data_seeds=tuple(args.data_seeds), num_alphas=args.alphas)
    print(f"round {result['round']} rewind step {result['rewind_step']}: barrier "
          f"{100 * result['barrier']:.2f} pp; errors "
          + " ".join(f"{e:.4f}" for e in result["errors"]))
    return 0


def add_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``lottery`` and ``instability`` to the ``sparsejax`` parser; returns handlers."""
    lottery = commands.add_parser("lottery", help="iterative magnitude pruning with rewinding")
    _add_config_arguments(lottery)
    stability = commands.add_parser(
        "instability", help="linear mode connectivity of two copies from the rewind point")
    _add_config_arguments(stability)
    stability.add_argument("--round", type=int, default=0, help="whose masks (0: dense)")
    stability.add_argument("--data-seeds", type=int, nargs=2, default=[101, 102],
                           help="data orders of the two copies")
    stability.add_argument("--alphas", type=int, default=11,
                           help="points on the line between the copies, ends included, >= 2")
    return {"lottery": _lottery_command, "instability": _instability_command}
