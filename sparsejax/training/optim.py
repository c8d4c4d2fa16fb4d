"""Optimizers by name, for the command line and experiment configs."""

from __future__ import annotations

import optax

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "make_optimizer"]

OPTIMIZERS = ("sgd", "nesterov", "adam")
LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(
    name: str = "sgd",
    learning_rate: float = 0.1,
    *,
    total_steps: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "cosine",
) -> optax.GradientTransformation:
    """An optax optimizer: SGD with momentum, Nesterov SGD, or Adam, with L2 weight decay
    added to the gradients and a constant or cosine-decayed learning rate.

    >>> opt = make_optimizer("sgd", 0.1, total_steps=100, weight_decay=5e-4)
    >>> type(opt).__name__
    'GradientTransformationExtraArgs'
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if learning_rate <= 0:
        raise ValueError(f"learning rate must be positive, got {learning_rate}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if lr_schedule == "cosine":
        schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
    else:
        schedule = optax.constant_schedule(learning_rate)
    if name == "adam":
        base = optax.adam(schedule)
    else:
        base = optax.sgd(schedule, momentum=momentum or None, nesterov=name == "nesterov")
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), base)
    return optax.chain(base)
