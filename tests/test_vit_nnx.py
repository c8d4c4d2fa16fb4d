"""The NNX ViT (sparsejax.harness.models.vit_nnx): its layout, the harness registry entry
``vit_nnx``, and the drop-in form ``sparsejax.nnx.sparsify`` on it. Tiny shapes; the layout
checks are abstract (``nnx.eval_shape``: nothing computed) and everything that needs values
(build, sparsify, one train step, the hard masks) is one jitted program run once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax.nnx
from sparsejax.harness.models import apply_model, get_model, init_model
from sparsejax.harness.models.vit_nnx import ViTNNX, patchify

TINY = {"image_size": 8, "channels": 1, "patch_size": 4, "embed_dim": 8, "depth": 1,
        "num_heads": 2, "use_bias": False}
KERNELS = ["blocks/0/attn/key/kernel", "blocks/0/attn/out/kernel", "blocks/0/attn/query/kernel",
           "blocks/0/attn/value/kernel", "blocks/0/fc1/kernel", "blocks/0/fc2/kernel",
           "head/kernel", "patch_embed/kernel"]


def sparsified() -> nnx.Module:
    """The tiny ViT sparsified by Edge-Popup at 50% (biases absent, the rest frozen)."""
    return sparsejax.nnx.sparsify(ViTNNX(10, **TINY, rngs=nnx.Rngs(0)), "edge_popup",
                                  sparsity=0.5, rng=1, other_params="frozen")


def paths(model: nnx.Module, kind: type) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, p)): v.shape
            for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def train_step(images: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
    """Build, sparsify, one SGD step; the loss, the step counter, the hard masks of
    ``blocks/0/fc1`` and of the position table, and the change of the scores."""
    model = sparsified()
    before = nnx.to_pure_dict(nnx.state(model, sparsejax.nnx.Score))
    optimizer = sparsejax.nnx.Optimizer(model, optax.sgd(0.1))

    def loss_fn(model):
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model, sparsejax.nnx.Score))
    change = jax.tree.map(lambda a, b: a - b, after, before)
    masks = sparsejax.nnx.hard_masks(model)
    return (loss, model.sparsejax.step[...], masks["blocks"][0]["fc1"]["kernel"],
            masks["pos_embed"]["embedding"], change)


def test_every_weight_matrix_is_a_2d_linear_kernel():
    params = paths(nnx.eval_shape(lambda: ViTNNX(10, **TINY, rngs=nnx.Rngs(0))), nnx.Param)
    assert sorted(p for p in params if p.endswith("kernel")) == KERNELS
    assert all(len(params[p]) == 2 for p in KERNELS)
    assert params["patch_embed/kernel"] == (16, 8) and params["pos_embed/embedding"] == (4, 8)
    # use_bias=False: biases only in the LayerNorms
    assert sorted(p for p in params if p.endswith("bias")) == [
        "blocks/0/norm1/bias", "blocks/0/norm2/bias", "norm/bias"]


def test_patchify_matches_a_strided_convolution():
    x = np.arange(2 * 8 * 8 * 2, dtype=np.float32).reshape(2, 8, 8, 2)
    kernel = np.random.default_rng(0).normal(size=(4, 4, 2, 3)).astype(np.float32)
    conv = np.stack([np.einsum("bhwc,hwco->bo", x[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4], kernel)
                     for i in range(2) for j in range(2)], axis=1)  # stride 4, row by row
    linear = np.asarray(patchify(jnp.asarray(x), 4)) @ kernel.reshape(-1, 3)
    np.testing.assert_allclose(linear, conv, rtol=1e-5)


def test_sparsify_scores_the_kernels_and_freezes_the_rest():
    model = nnx.eval_shape(sparsified)
    assert sorted(paths(model, sparsejax.nnx.Score)) == [f"{p}_scores" for p in KERNELS]
    frozen = paths(model, sparsejax.nnx.Frozen)
    assert set(KERNELS) | {"pos_embed/embedding", "norm/scale", "blocks/0/norm1/bias"} <= set(
        frozen)
    assert not paths(model, nnx.Param).keys() - {f"{p}_scores" for p in KERNELS}


def test_a_train_step_through_sparsify_traces():
    # traced, not compiled (the experiment trains it for real): a step of the drop-in form
    # differentiates the scores of every kernel and yields a mask for each leaf
    images, labels = jnp.zeros((4, 8, 8, 1)), jnp.arange(4)
    loss, step, fc1, table, change = jax.eval_shape(train_step, images, labels)
    assert loss.shape == () and step.dtype == jnp.int32
    assert fc1.shape == (8, 16) and fc1.dtype == jnp.bool_ and table.shape == (4, 8)
    assert sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(
        nnx.State(change))) == [f"{p}_scores" for p in KERNELS]


def test_registered_for_the_harness():
    model = get_model("vit_nnx", 10, **TINY)
    params, state = jax.eval_shape(lambda: init_model(model, jax.random.key(0), (1, 8, 8, 1)))
    logits, _ = jax.eval_shape(lambda p: apply_model(model, p, {}, jnp.zeros((4, 8, 8, 1)),
                                                     train=False), params)
    assert logits.shape == (4, 10) and state == {}
    with pytest.raises(ValueError, match="built for images of shape"):
        jax.eval_shape(lambda p: apply_model(model, p, {}, jnp.zeros((1, 12, 12, 1)),
                                             train=False), params)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        get_model("vit_nnx", 10, image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_model("vit_nnx", 10, embed_dim=10, num_heads=4)
