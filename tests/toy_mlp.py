"""A two-layer MLP (20 -> 16 -> 4) and a fixed batch stream, shared by the method tests."""

import jax
import jax.numpy as jnp
import optax


def mlp_params(key, scale=0.3):
    k1, k2 = jax.random.split(key)
    return {"Dense_0": {"kernel": jax.random.normal(k1, (20, 16)) * scale,
                        "bias": jnp.zeros(16)},
            "Dense_1": {"kernel": jax.random.normal(k2, (16, 4)) * scale, "bias": jnp.zeros(4)}}


def mlp_loss(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    logits = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(n):
    """``n`` batches of 32 examples: ``x`` of shape (n, 32, 20), labels (n, 32) in 0..3."""
    key = jax.random.PRNGKey(42)
    x = jax.random.normal(key, (n, 32, 20))
    y = jax.random.randint(jax.random.fold_in(key, 1), (n, 32), 0, 4)
    return x, y
