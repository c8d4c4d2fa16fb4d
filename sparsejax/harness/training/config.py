"""What defines a training run (:class:`TrainConfig`, written in full to ``result.json``),
the checks it must pass before anything runs (:func:`check_config`), and the method it
builds (:func:`build_method`)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import optax

from sparsejax.core.validation import (
    check_finite_number,
    check_int,
    check_local_path,
    check_sparsity,
)
from sparsejax.engine.parallel import PARALLEL_MODES
from sparsejax.harness.models import check_model_dataset
from sparsejax.harness.training.optim import check_lr_schedule
from sparsejax.methods import METHODS, Method, get_method

__all__ = ["TrainConfig", "SEED_MAX", "KEEP_BEST", "check_config", "build_method", "run_length"]


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (written in full to ``result.json``)."""

    method: str = "dense"
    model: str = "lenet300"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    sparsity: float | None = None
    distribution: str | None = None
    # The training fields below left at None take the method's recipe for the model's
    # family, else the library default (sparsejax.harness.training.recipes; ``recipe="none"``:
    # library defaults only). ``epochs``: the recipe's, else 1, when ``steps`` is not given.
    recipe: str = "auto"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None  # library default 128
    optimizer: str | None = None  # sgd
    lr: float | None = None  # 0.1
    momentum: float | None = None  # 0.9
    weight_decay: float | None = None  # 0.0
    lr_schedule: str | None = None  # cosine
    lr_decay_every: int = 0  # lr_schedule "step": lr x0.1 every this many steps
    seed: int = 0
    eval_every: int = 0  # steps between evaluations; 0: once per epoch
    log_every: int = 50
    checkpoint_every: int = 0  # steps between checkpoints; 0: once per epoch
    keep_checkpoints: int = 3
    # keep the keep_checkpoints best checkpoints by this held-out metric (and always the
    # newest, to resume from) instead of the newest: validation_loss | validation_accuracy
    keep_best: str | None = None
    init_batches: int = 1  # training batches a method may score weights on at init
    # training examples held out (a fixed seeded choice, sparsejax.harness.data.split_validation)
    # and evaluated beside the test set; 0: train on the whole training set
    validation_size: int = 0
    # a relaxed method (the gates) on a model with batch norm is evaluated with batch-norm
    # statistics recomputed for its binary mask over this many training batches (a fixed
    # seeded choice, sparsejax.harness.training.batch_norm); 0: with the running averages
    # of training, which describe the relaxed network (a RelaxedBatchNormWarning)
    bn_recalibration_batches: int = 40
    parallel: str = "none"  # none | pmap | sharded (sparsejax.engine.parallel)
    nonfinite: str = "error"  # error | skip: what a NaN/inf loss or gradient does
    max_skipped_fraction: float = 0.5  # with nonfinite="skip": more skipped steps fail the run
    # also write TensorBoard events where tensorboardX (the ``tensorboard`` extra) is
    # installed; without it the run writes metrics.jsonl alone
    tensorboard: bool = True
    out: str | None = None
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace a run already in ``out``
    progress: bool = True  # a tqdm bar (the ``progress`` extra; without it: a warning, no bar)
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainConfig:
        """The config a run saved (``result.json``'s or a ticket's ``config``): it holds the
        run's effective values, so no recipe is applied again (one added after an older run
        was made must not fill what that run left at the default)."""
        return cls(**{**saved, "recipe": "none"})

    def default_out(self) -> str:
        sparsity = "" if self.sparsity is None else f"_s{self.sparsity:g}"
        return f"runs/{self.method}_{self.model}_{self.dataset}{sparsity}_seed{self.seed}"


def build_method(config: TrainConfig, optimizer: optax.GradientTransformation, *,
                 total_steps: int | None = None,
                 batches_per_epoch: int | None = None,
                 apply_fn: Any = None) -> Method:
    """The registered method of ``config``, given ``--sparsity``/``--distribution`` and
    method options only where the method takes them. Builders that take ``total_steps``
    or ``batches_per_epoch`` (e.g. to place an end step or an update interval) get them
    from the run, and builders that take ``apply_fn`` (``(params, model_state, inputs) ->
    logits`` in evaluation mode, e.g. SynFlow and GraSP) get the model's."""
    if config.method not in METHODS:
        raise ValueError(
            f"unknown method {config.method!r}; known methods: {', '.join(sorted(METHODS))}"
        )
    accepted = inspect.signature(METHODS[config.method]).parameters
    options = dict(config.method_options)
    if "prunable" in options and not callable(options["prunable"]):
        raise ValueError(
            f"--method-option prunable must be a filter function (path, leaf) -> bool, which "
            f"only the Python API can pass; got {options['prunable']!r}")
    for name in ("sparsity", "distribution"):
        value = getattr(config, name)
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"method {config.method!r} does not take --{name}")
        options[name] = value
    run_facts = {"total_steps": total_steps, "batches_per_epoch": batches_per_epoch,
                 "apply_fn": apply_fn}
    for name, value in run_facts.items():
        if name in accepted and value is not None and name not in options:
            options[name] = value
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(
            f"method {config.method!r} got unknown option(s) {unknown}; it takes: "
            f"{', '.join(p for p in accepted if p not in ('optimizer', *run_facts))}"
        )
    if "sparsity" in accepted and "sparsity" not in options and (
        accepted["sparsity"].default is inspect.Parameter.empty
    ):
        raise ValueError(f"method {config.method!r} needs --sparsity")
    return get_method(config.method, optimizer, **options)


def run_length(config: TrainConfig, batches_per_epoch: int) -> int:
    """The number of steps of ``config``'s run: ``steps``, or ``epochs`` of
    ``batches_per_epoch``.

    >>> run_length(TrainConfig(epochs=2), 30), run_length(TrainConfig(steps=7), 30)
    (60, 7)
    """
    if (config.epochs is None) == (config.steps is None):
        raise ValueError("give exactly one of epochs or steps")
    total = config.steps if config.steps is not None else config.epochs * batches_per_epoch
    if total < 1:
        raise ValueError(f"the run must have at least one step, got {total}")
    return total


SEED_MAX = 2**32 - 1  # the data generators (mnist1d, numpy) take 32-bit seeds


KEEP_BEST = {"validation_loss": "min", "validation_accuracy": "max"}
"""The held-out metrics ``--keep-best`` may rank checkpoints by, and which way is best."""


METHOD_OPTION_FLAGS = {"sparsity": "--sparsity", "distribution": "--distribution"}
"""Method options that a run sets from a first-class flag (the flag is handed to the method
in their place, so a ``--method-option`` beside it is refused)."""


def check_config(config: TrainConfig) -> None:
    """Raise ``ValueError`` (or ``TypeError``) naming the flag of the first bad value in
    ``config``; host-side only, before any data is loaded or anything is compiled."""
    if config.parallel not in PARALLEL_MODES:
        raise ValueError(
            f"unknown parallel mode {config.parallel!r}; known: {', '.join(PARALLEL_MODES)}")
    if config.nonfinite not in ("error", "skip"):
        raise ValueError(f"nonfinite must be 'error' or 'skip', got {config.nonfinite!r}")
    if config.sparsity is not None:
        check_sparsity(config.sparsity, "--sparsity")
    for name in METHOD_OPTION_FLAGS:  # the flag would silently win over the option
        if name in config.method_options and getattr(config, name) is not None:
            flag = METHOD_OPTION_FLAGS[name]
            raise ValueError(f"--method-option {name}={config.method_options[name]} and {flag} "
                             f"{getattr(config, name)} both set the method's {name}: give it "
                             f"once, with {flag}")
    check_model_dataset(config.model, config.dataset)  # before any data or compile
    check_int(config.seed, "--seed", minimum=0, maximum=SEED_MAX)
    check_int(config.log_every, "--log-every", minimum=1)
    check_int(config.eval_every, "--eval-every", minimum=0)
    check_int(config.checkpoint_every, "--checkpoint-every", minimum=0)
    check_int(config.init_batches, "--init-batches", minimum=0)
    check_int(config.validation_size, "--validation-size", minimum=0)
    check_int(config.bn_recalibration_batches, "--bn-recalibration-batches", minimum=0)
    check_int(config.lr_decay_every, "--lr-decay-every", minimum=0)
    check_lr_schedule(config.lr_schedule, config.lr_decay_every)  # before any data loads
    check_finite_number(config.max_skipped_fraction, "--max-skipped-fraction")
    if not 0 <= config.max_skipped_fraction <= 1:
        raise ValueError(f"--max-skipped-fraction must lie in [0, 1], got "
                         f"{config.max_skipped_fraction}")
    if config.out is not None:
        check_local_path(config.out, "--out")  # before Path() turns a URL into a local path
    if config.keep_best not in (None, *KEEP_BEST):
        raise ValueError(f"--keep-best must be {' or '.join(KEEP_BEST)}, got "
                         f"{config.keep_best!r}")
    if config.keep_best is not None and not config.validation_size:
        raise ValueError(f"--keep-best {config.keep_best} needs a held-out split "
                         "(--validation-size N): the test set must not choose the checkpoint")
    if config.resume and config.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: --resume continues the "
                         "run in --out, --overwrite replaces it")
    for flag, value in (("--lr", config.lr), ("--momentum", config.momentum),
                        ("--weight-decay", config.weight_decay)):
        check_finite_number(value, flag)


# Fields that may differ on --resume: they change what is logged, shown or kept, not the
# trained state (the length, --steps/--epochs, is checked on its own). ``nonfinite`` may
# change too: a checkpoint written under ``error`` holds no non-finite step, so it is the
# same state a ``skip`` run would have reached, and skipped steps are counted across resumes.
# ``parallel`` may change too: a checkpoint holds one logical state that resumes on another
# device layout (docs/parallel.md), equal up to floating-point rounding.
