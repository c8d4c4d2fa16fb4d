"""The compiled trainer of the lottery driver (:class:`Trainer`): a masked model on an
in-memory dataset, each stretch of steps one ``lax.scan``, the data order a function of
the step alone so that a branch continued from the rewind step sees the batches of an
uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.core.masks import dense_masks
from sparsejax.engine.step import make_train_step
from sparsejax.harness.data import Dataset, epoch_permutation, load_dataset, steps_per_epoch
from sparsejax.harness.lottery.config import LotteryConfig, parse_step
from sparsejax.harness.models import get_model, init_model
from sparsejax.harness.training.loop import classification_loss, make_eval_step
from sparsejax.harness.training.optim import make_optimizer
from sparsejax.methods.base import Method, SparseState
from sparsejax.methods.fixed import fixed_mask

__all__ = ["Trainer"]

PyTree = Any


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

