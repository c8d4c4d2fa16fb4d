"""Train and eval steps and the training loop."""

from sparsejax.training.step import LossFn, make_train_step, stateless_loss

__all__ = ["LossFn", "make_train_step", "stateless_loss"]
