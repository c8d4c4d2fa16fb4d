"""The pieces of a training run that follow from its config alone: the data (and its
validation split), the model, the optimizer, the method and the initial state
(:func:`prepare`); what :func:`sparsejax.harness.training.loop.train` runs, and what a
finished run's folder is restored into."""

from __future__ import annotations

import itertools
import warnings
from typing import Any, NamedTuple

import jax

from sparsejax.harness.data import (
    Dataset,
    load_dataset,
    split_validation,
    steps_per_epoch,
    train_batches,
)
from sparsejax.harness.models import get_model, init_model
from sparsejax.harness.training.batch_norm import needs_recalibration
from sparsejax.harness.training.config import TrainConfig, build_method, check_config, run_length
from sparsejax.harness.training.evaluation import classification_loss, model_apply_fn
from sparsejax.harness.training.optim import make_optimizer
from sparsejax.harness.training.recipes import resolve_recipe
from sparsejax.methods import InitContext, Method, SparseState

__all__ = ["Run", "RelaxedBatchNormWarning", "prepare", "prepare_run", "load_run_dataset"]


class Run(NamedTuple):
    """The pieces of a training run that follow from its config alone."""

    dataset: Dataset
    model: Any
    method: Method
    state: SparseState  # the initial state
    batches_per_epoch: int
    total_steps: int
    # the held-out examples (TrainConfig.validation_size) as a dataset whose test split
    # they are (sparsejax.harness.data.split_validation); None without a validation split
    validation: Dataset | None = None


def prepare(config: TrainConfig) -> Run:
    """Load the data and build model, optimizer, method and initial state of ``config``
    (its unset training fields resolved by :func:`resolve_recipe`)."""
    config, _ = resolve_recipe(config)
    check_config(config)
    return prepare_run(config)


def load_run_dataset(config: TrainConfig, data_dir: str | None = None) -> Dataset:
    """The dataset of ``config`` (from ``data_dir`` if given): a text dataset in windows of
    the model's ``context`` option."""
    return load_dataset(config.dataset, data_dir or config.data_dir, seed=config.seed,
                        context=config.model_options.get("context"))


class RelaxedBatchNormWarning(UserWarning):
    """The gates on a model with batch norm, evaluated with the running statistics of
    training (``bn_recalibration_batches=0``): they describe the relaxed network that
    trained, not the binary mask that is evaluated."""


def prepare_run(config: TrainConfig, *, abstract_state: bool = False) -> Run:
    """:func:`prepare` of a config already resolved and checked. With ``abstract_state``
    the state is only its shapes and dtypes (``jax.eval_shape``): a resume restores every
    value from the checkpoint, so it neither compiles nor runs the method's init
    (SynFlow's 100 rounds, SNIP's and GraSP's gradients)."""
    dataset = load_run_dataset(config)
    validation = None
    if config.validation_size:
        dataset, validation = split_validation(dataset, config.validation_size)
    batches_per_epoch = steps_per_epoch(len(dataset.train_labels), config.batch_size)
    total_steps = run_length(config, batches_per_epoch)
    model = get_model(config.model, dataset.num_classes, **config.model_options)
    init_key, method_key = jax.random.split(jax.random.PRNGKey(config.seed))
    params, model_state = init_model(model, init_key, (1, *dataset.input_shape))
    optimizer = make_optimizer(config.optimizer, config.lr, total_steps=total_steps,
                               momentum=config.momentum, weight_decay=config.weight_decay,
                               lr_schedule=config.lr_schedule,
                               lr_decay_every=config.lr_decay_every)
    method = build_method(config, optimizer, total_steps=total_steps,
                          batches_per_epoch=batches_per_epoch,
                          apply_fn=model_apply_fn(model))
    if needs_recalibration(method, model_state) and not config.bn_recalibration_batches:
        warnings.warn(RelaxedBatchNormWarning(
            f"--method {method.name} on {config.model}, a model with batch norm, with "
            "--bn-recalibration-batches 0: the running statistics that evaluation uses are "
            "gathered through the relaxed gates during training, not through the binary "
            "mask that is evaluated, so the reported accuracy can be far below what the "
            "mask achieves (a ResNet-20 at 90% scored 11.85% so, 67.17% with the statistics "
            "recomputed for the mask; docs/results.md, 'Batch norm and the gates')"),
            stacklevel=2)
    loss_fn = classification_loss(model)
    stream = train_batches(dataset, config.batch_size, config.seed)
    init_batches = tuple(batch for _, batch in itertools.islice(stream, config.init_batches))

    def init_params(key: jax.Array) -> Any:  # a fresh draw (snip's fresh_init)
        return init_model(model, key, (1, *dataset.input_shape))[0]

    @jax.jit
    def init(params: Any, key: jax.Array, model_state: Any, batches: tuple[Any, ...]):
        return method.init(params, key, model_state,
                           InitContext(loss_fn, batches, init_params))

    args = (params, method_key, model_state, init_batches)
    state = jax.eval_shape(init, *args) if abstract_state else init(*args)
    return Run(dataset, model, method, state, batches_per_epoch, total_steps, validation)
