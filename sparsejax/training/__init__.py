"""Train and eval steps and the training loop."""

from sparsejax.training.optim import LR_SCHEDULES, OPTIMIZERS, make_optimizer
from sparsejax.training.step import LossFn, make_train_step, stateless_loss

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "LossFn",
    "make_optimizer",
    "make_train_step",
    "stateless_loss",
]
