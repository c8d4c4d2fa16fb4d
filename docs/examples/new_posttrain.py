"""Where things go: a new post-training pruning algorithm (docs/design.md).

An algorithm prunes one kernel `(in, out)` from its calibration inputs `X`, or from
`H = X^T X`, which the sequential driver accumulates; registered by name, it is reached by
`sparsejax.prune_layer`, the sequential driver and `sparsejax prune --method`. This one
scores each weight by its relative importance within its output and its input, times its
input's activation norm (the score of RIA, Zhang et al. 2024, with exponent 1/2), and
keeps the top scores in any pattern with the library's exact top-k. Run it:
`python docs/examples/new_posttrain.py` (tests/test_where_things_go.py does).
"""

import jax
import jax.numpy as jnp

import sparsejax
from sparsejax.posttrain.pruners import PrunedLayer, posttrain_density


def relative_importance_prune(kernel, hessian, pattern="unstructured", sparsity=None):
    """Keep the top ``(|W| / column sums + |W| / row sums) * ||x_j||^(1/2)`` of a kernel."""
    w = jnp.abs(kernel.astype(jnp.float32))
    relative = w / jnp.sum(w, axis=0, keepdims=True) + w / jnp.sum(w, axis=1, keepdims=True)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(hessian), 0.0))  # ||x_j||_2 per input j
    scores = relative * jnp.sqrt(norms)[:, None]
    mask = sparsejax.pattern_mask(scores, pattern, posttrain_density(pattern, sparsity))
    return PrunedLayer(jnp.where(mask, kernel, 0).astype(kernel.dtype), mask)


def from_inputs(kernel, inputs, pattern="unstructured", sparsity=None):
    return relative_importance_prune(kernel, sparsejax.input_hessian(inputs), pattern, sparsity)


sparsejax.register_posttrain_method(
    "relative_importance", sparsejax.PosttrainPruner(from_inputs, relative_importance_prune))

if __name__ == "__main__":
    kernel = jax.random.normal(jax.random.key(0), (16, 8))
    inputs = jax.random.normal(jax.random.key(1), (64, 16)) * jnp.arange(1.0, 17.0)
    layer = sparsejax.prune_layer("relative_importance", kernel, inputs, "2:4")
    groups = layer.mask.T.reshape(8, 4, 4).sum(axis=-1)  # every output's groups of 4 inputs
    assert groups.tolist() == [[2] * 4] * 8  # exactly 2 of every 4
    pruned, report = sparsejax.prune_mlp_sequential(
        {"fc1": {"kernel": kernel, "bias": jnp.zeros(8)},
         "head": {"kernel": jax.random.normal(jax.random.key(2), (8, 4)), "bias": jnp.zeros(4)}},
        inputs, "relative_importance", "unstructured", 0.5)
    assert [(r.name, r.density) for r in report] == [("fc1", 0.5), ("head", 0.5)]
    print("relative_importance: 2:4 exact, and the sequential driver prunes by it")
