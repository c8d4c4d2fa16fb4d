"""Optimizers by name, for the command line and experiment configs."""

from __future__ import annotations

from typing import Any

import optax

from sparsejax.core.validation import is_int

__all__ = ["OPTIMIZERS", "LR_SCHEDULES", "make_optimizer", "check_lr_schedule",
           "step_lr_schedule"]

OPTIMIZERS = ("sgd", "nesterov", "adam")
LR_SCHEDULES = ("constant", "cosine", "step")


def make_optimizer(
    name: str = "sgd",
    learning_rate: float = 0.1,
    *,
    total_steps: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    lr_schedule: str = "cosine",
    lr_decay_every: int = 0,
) -> optax.GradientTransformation:
    """An optax optimizer: SGD with momentum, Nesterov SGD, or Adam, with L2 weight decay
    added to the gradients and a learning rate that is constant, cosine-decayed over
    ``total_steps``, or (``lr_schedule="step"``) a step schedule, :func:`step_lr_schedule`:
    multiplied by 0.1 every ``lr_decay_every`` steps (SNIP's "divided by 10 every 25k
    iterations"). ``lr_decay_every`` belongs to the step schedule alone.

    >>> opt = make_optimizer("sgd", 0.1, total_steps=100, weight_decay=5e-4)
    >>> type(opt).__name__
    'GradientTransformationExtraArgs'
    >>> opt = make_optimizer("sgd", 0.1, total_steps=100, lr_schedule="step", lr_decay_every=25)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    check_lr_schedule(lr_schedule, lr_decay_every)
    if learning_rate <= 0:
        raise ValueError(f"learning rate must be positive, got {learning_rate}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if lr_schedule == "cosine":
        schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
    elif lr_schedule == "step":
        schedule = step_lr_schedule(learning_rate, lr_decay_every)
    else:
        schedule = optax.constant_schedule(learning_rate)
    if name == "adam":
        base = optax.adam(schedule)
    else:
        base = optax.sgd(schedule, momentum=momentum or None, nesterov=name == "nesterov")
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), base)
    return optax.chain(base)


def check_lr_schedule(lr_schedule: str, lr_decay_every: int = 0) -> None:
    """Raise ``ValueError`` unless ``lr_schedule`` is known and ``lr_decay_every`` is set
    exactly when it is ``'step'`` (``sparsejax train`` checks this before loading data).

    >>> check_lr_schedule("step", 25_000)
    >>> check_lr_schedule("cosine", 25_000)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: lr_decay_every (CLI: --lr-decay-every) sets the step schedule; ...
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if lr_schedule != "step" and lr_decay_every:
        raise ValueError(f"lr_decay_every (CLI: --lr-decay-every) sets the step schedule; "
                         f"it needs lr_schedule 'step', got {lr_schedule!r}")
    if lr_schedule == "step":
        _check_decay_every(lr_decay_every)


def _check_decay_every(decay_every: Any) -> None:
    if not is_int(decay_every) or decay_every < 1:
        raise ValueError(f"the step lr schedule needs lr_decay_every (CLI: --lr-decay-every), "
                         f"the steps between decays, an int >= 1; got {decay_every!r}")


def step_lr_schedule(learning_rate: float, decay_every: int,
                     factor: float = 0.1) -> optax.Schedule:
    """``learning_rate * factor ** (count // decay_every)``: the learning rate multiplied
    by ``factor`` (0.1) every ``decay_every`` steps. ``count`` is optax's, the number of
    updates already applied, so training steps ``1 .. decay_every`` use ``learning_rate``
    and step ``decay_every + 1`` is the first at ``learning_rate * factor``.

    >>> schedule = step_lr_schedule(0.1, 25_000)
    >>> [round(float(schedule(n)), 6) for n in (0, 24_999, 25_000, 50_000, 75_000)]
    [0.1, 0.1, 0.01, 0.001, 0.0001]
    """
    _check_decay_every(decay_every)
    if not 0 < factor < 1:
        raise ValueError(f"the decay factor must lie in (0, 1), got {factor}")
    return optax.exponential_decay(learning_rate, transition_steps=decay_every,
                                   decay_rate=factor, staircase=True)
