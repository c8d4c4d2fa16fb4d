"""Batch-norm statistics recomputed for the network that is evaluated.

The gates train through relaxed gates (continuous, noisy ``z`` in [0, 1]), so batch
norm's running averages describe that network, while evaluation runs the frozen weights
times the binary mask: on a ResNet-20 at 90% the reported accuracy was 11.85% with the
running averages and 67.17% with statistics of the binary mask (docs/results.md, "Batch
norm and the gates"). :func:`recalibrated_batch_stats` recomputes every batch norm's mean
and variance over fixed training batches through the effective weights, with no
parameter changed and nothing chosen on the test set; the harness evaluates the gates so
(``TrainConfig.bn_recalibration_batches``).

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> class Net(nn.Module):
...     @nn.compact
...     def __call__(self, x, train=False):
...         return nn.BatchNorm(use_running_average=not train)(x)
>>> variables = Net().init(jax.random.PRNGKey(0), jnp.ones((2, 3)))
>>> images = [jnp.array([[0.0, 1, 2], [2, 3, 4]]), jnp.array([[4.0, 5, 6], [6, 7, 8]])]
>>> stats = recalibrated_batch_stats(Net(), variables["params"],
...                                  {"batch_stats": variables["batch_stats"]}, images)
>>> layer = stats["batch_stats"]["BatchNorm_0"]  # over all four examples: mean, variance
>>> [round(float(v), 3) for v in layer["mean"]], [round(float(v), 3) for v in layer["var"]]
([3.0, 4.0, 5.0], [5.0, 5.0, 5.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.harness.models import apply_model
from sparsejax.methods.base import Method

__all__ = ["needs_recalibration", "recalibration_images", "recalibrated_batch_stats",
           "recalibrator"]


def needs_recalibration(method: Method, model_state: Any) -> bool:
    """Whether a run of ``method`` on a model with this ``model_state`` evaluates with
    running statistics of another network: a method whose training forward pass is
    relaxed (``Method.relaxed_forward``, the gates) on a model with batch norm."""
    return method.relaxed_forward and "batch_stats" in (model_state or {})


def recalibration_images(train_images: np.ndarray, batches: int, batch_size: int,
                         seed: int) -> list[np.ndarray]:
    """``batches`` batches of ``batch_size`` training images, a fixed seeded choice
    without repeats (fewer batches when the training set is smaller)."""
    order = np.random.default_rng(seed).permutation(len(train_images))
    batches = min(batches, len(order) // batch_size)
    return [train_images[order[i * batch_size:(i + 1) * batch_size]] for i in range(batches)]


def recalibrated_batch_stats(model: Any, params: Any, model_state: Any,
                             images: Sequence[Any]) -> Any:
    """``model_state`` with every batch norm's ``mean`` and ``var`` recomputed through
    ``params`` over ``images`` (equally large batches): the mean and the biased variance
    over all of their examples (the mean of the batch variances plus the variance of the
    batch means), from forward passes in training mode. ``recalibrator(model)`` is the
    same, compiled once for every later call (the harness evaluates so).

    A batch-norm layer updates ``running = m * running + (1 - m) * batch``; one pass
    from running statistics of zeros and one from ones give ``m`` and the batch's own
    statistics without knowing the layer's momentum, to float32 rounding divided by
    ``1 - m`` (about 1e-5 relative at Flax's default momentum of 0.99, 1e-6 at the model
    zoo's 0.9: far below the sampling error of any number of batches).
    """
    return recalibrator(model)(params, model_state, images)


def recalibrator(model: Any) -> Callable[[Any, Any, Sequence[Any]], Any]:
    """``(params, model_state, images) -> model_state``: :func:`recalibrated_batch_stats`
    of ``model``, its per-batch pass compiled once."""

    @jax.jit
    def batch_stats(params: Any, model_state: Any, batch: Any) -> Any:
        def updated(start: float) -> Any:
            state = {**model_state, "batch_stats": jax.tree.map(
                lambda v: jnp.full_like(v, start), model_state["batch_stats"])}
            return apply_model(model, params, state, batch, train=True)[1]["batch_stats"]

        from_zeros, from_ones = updated(0.0), updated(1.0)
        # from_zeros = (1 - m) * b and from_ones = m + (1 - m) * b
        return jax.tree.map(lambda z, o: z / (1.0 - (o - z)), from_zeros, from_ones)

    def recalibrate(params: Any, model_state: Any, images: Sequence[Any]) -> Any:
        if not images:
            raise ValueError("recalibrated_batch_stats needs at least one batch of images")
        if len({np.shape(batch)[0] for batch in images}) != 1:
            raise ValueError("recalibrated_batch_stats takes batches of one size (an exact "
                             "mean over all examples weighs every batch alike)")
        per_batch = [batch_stats(params, model_state, jnp.asarray(batch)) for batch in images]

        def combined(*layer: dict[str, jax.Array]) -> dict[str, jax.Array]:
            means = jnp.stack([stats["mean"] for stats in layer])
            variances = jnp.stack([stats["var"] for stats in layer])
            return {"mean": jnp.mean(means, 0),
                    "var": jnp.mean(variances, 0) + jnp.var(means, 0)}

        return {**model_state, "batch_stats": jax.tree.map(
            combined, *per_batch, is_leaf=lambda node: isinstance(node, dict)
            and set(node) == {"mean", "var"})}

    return recalibrate
