"""NNX rows of ``own_loop.py``: Edge-Popup on an NNX LeNet-300-100 through
``sparsejax.nnx`` against the same NNX model trained densely with
``nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)``.

Both steps use Flax's functional pattern for speed (``nnx.split`` once, ``jax.jit`` of a
function that merges, steps and splits, the state donated), so neither pays ``nnx.jit``'s
per-call graph traversal, and both are timed in alternation in one process.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from step_time import block_time, host, interleaved_medians

import sparsejax

BATCH = 128


class LeNet300(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(784, 300, rngs=rngs)
        self.fc2 = nnx.Linear(300, 100, rngs=rngs)
        self.head = nnx.Linear(100, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def functional_step(model: nnx.Module, optimizer: nnx.Optimizer, wrt: Any):
    graphdef, state = nnx.split((model, optimizer))

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state: Any, batch: Any) -> tuple[Any, jax.Array]:
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model: nnx.Module) -> jax.Array:
            logits = model(batch["image"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return loss.mean() + (sparsejax.nnx.penalty(model)
                                  if hasattr(model, "sparsejax") else 0.0)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return step, state


def nnx_edge_popup_rows(block: int, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)}
    dense_model = LeNet300(nnx.Rngs(0))
    dense_step, dense = functional_step(
        dense_model, nnx.Optimizer(dense_model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param),
        nnx.Param)
    sparse_model = sparsejax.nnx.sparsify(LeNet300(nnx.Rngs(0)), "edge_popup", rng=1,
                                          sparsity=0.5)
    sparse_step, sparse = functional_step(
        sparse_model, sparsejax.nnx.Optimizer(sparse_model, optax.sgd(0.1, momentum=0.9)),
        sparsejax.nnx.Trainable)
    _, dense = block_time(dense_step, dense, batch, 3)
    _, sparse = block_time(sparse_step, sparse, batch, 3)
    medians, _ = interleaved_medians({"dense": dense_step, "edge_popup": sparse_step},
                                     {"dense": dense, "edge_popup": sparse}, batch, block,
                                     repeats)
    row = {"method": "edge_popup", "form": "sparsejax.nnx", "model": "lenet300 (nnx)",
           "batch_size": BATCH, "dense_ms": round(medians["dense"], 4),
           "method_ms": round(medians["edge_popup"], 4),
           "ratio": round(medians["edge_popup"] / medians["dense"], 4),
           "baseline": "the same NNX model, nnx.Optimizer(sgd(0.1, momentum=0.9), "
                       "wrt=nnx.Param)", **host()}
    print(row, flush=True)
    return [row]
