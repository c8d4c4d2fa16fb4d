"""Evaluation inside the training loop: the loss of a classification model, its compiled
evaluation step, test-set passes and the measured sparsity of the effective weights."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.core.masks import sparsity_report
from sparsejax.engine.step import LossFn
from sparsejax.harness.data import Dataset
from sparsejax.harness.models import apply_model

__all__ = ["classification_loss", "make_eval_step", "evaluate", "measured_sparsity",
           "model_apply_fn"]


def classification_loss(model: Any) -> LossFn:
    """Softmax cross-entropy of ``model`` on ``{"image", "label"}`` batches, with accuracy
    as a metric and batch statistics threaded through ``model_state``. Sequence models
    (logits ``(B, T, V)``, labels ``(B, T)``) get both as means over every token."""

    def loss_fn(params: Any, model_state: Any, batch: dict[str, jax.Array]):
        logits, new_model_state = apply_model(model, params, model_state, batch["image"],
                                              train=True)
        labels = batch["label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, (new_model_state, {"accuracy": accuracy})

    return loss_fn


def make_eval_step(model: Any):
    """``eval_step((params, model_state), batch) -> sums`` of correct predictions, loss and
    examples (tokens, for a sequence model: ``count`` is then examples x tokens);
    ``batch["weight"]`` ``(B,)`` marks padding examples. ``params`` are the method's
    ``effective_params``, computed once per evaluation rather than once per batch (the
    gates derive their hard mask, a global top-k, when it is read).
    """

    def eval_step(arrays: tuple[Any, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        params, model_state = arrays
        logits, _ = apply_model(model, params, model_state, batch["image"], train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        # one weight per example, broadcast over its tokens (labels (B,) or (B, T))
        weight = batch["weight"].reshape(batch["weight"].shape + (1,) * (losses.ndim - 1))
        weight = jnp.broadcast_to(weight, losses.shape)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * weight), "loss": jnp.sum(losses * weight),
                "count": jnp.sum(weight)}

    return eval_step


def _padded_test_batches(dataset: Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Test batches of one fixed shape (so one compilation), padding marked by weight 0."""
    images, labels = dataset.test_images, dataset.test_labels
    for begin in range(0, len(labels), batch_size):
        image, label = images[begin:begin + batch_size], labels[begin:begin + batch_size]
        pad = batch_size - len(label)
        weight = np.ones(len(label), np.float32)
        if pad:
            image = np.concatenate([image, np.zeros((pad, *image.shape[1:]), image.dtype)])
            label = np.concatenate([label, np.zeros((pad, *label.shape[1:]), label.dtype)])
            weight = np.concatenate([weight, np.zeros(pad, np.float32)])
        yield {"image": image, "label": label, "weight": weight}


def evaluate(eval_step: Any, arrays: tuple[Any, Any], dataset: Dataset,
             batch_size: int = 1000) -> dict[str, float]:
    """Test accuracy (0 to 1) and mean loss over the whole test set of the model with
    ``arrays = (params, model_state)`` (see :func:`make_eval_step`)."""
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for batch in _padded_test_batches(dataset, batch_size):
        sums = jax.device_get(eval_step(arrays, batch))
        for key in totals:
            totals[key] += float(sums[key])
    return {"accuracy": totals["correct"] / totals["count"],
            "loss": totals["loss"] / totals["count"]}


def measured_sparsity(effective_params: Any) -> float:
    """Fraction of prunable weights that are exactly zero in the effective model."""
    return float(sparsity_report(jax.device_get(effective_params))[-1].sparsity)


def model_apply_fn(model: Any) -> Any:
    """``apply_fn(params, model_state, inputs) -> logits`` of ``model`` in evaluation mode
    (batch norm on its running statistics), for methods that need the network's outputs."""

    def apply_fn(params: Any, model_state: Any, inputs: jax.Array) -> jax.Array:
        return apply_model(model, params, model_state, inputs, train=False)[0]

    return apply_fn
