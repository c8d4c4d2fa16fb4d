"""What defines a training run (:class:`TrainConfig`, written in full to ``result.json``)
and the method it builds (:func:`build_method`)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import optax

from sparsejax.methods import METHODS, Method, get_method

__all__ = ["TrainConfig", "build_method", "run_length"]


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
