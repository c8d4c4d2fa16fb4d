"""The Flax NNX tutorial's own train step, unchanged, on a sparsified model; what sparsify
does to biases and BatchNorm; ``masks_of`` of an ``nnx.Optimizer`` (issue #28, item 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
import sparsejax.nnx as snnx


class CNN(nnx.Module):
    """The shape of the Flax NNX MNIST tutorial's CNN (smaller), with a BatchNorm."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.linear = nnx.Linear(8 * 7 * 7, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.norm(self.conv(x))), window_shape=(2, 2),
                         strides=(2, 2))
        return self.linear(x.reshape(x.shape[0], -1))


def _batches(n):
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (n, 16, 14, 14, 1))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (n, 16), 0, 10)
    return images, labels


# The tutorial's loss and train step, as written there (for a dense model).
def loss_fn(model, batch):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=batch["label"]).mean()
    return loss, logits


@nnx.jit
def train_step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    return loss


def _pure(model, kind):
    return jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, kind)))


def _train(model, steps=4):
    optimizer = nnx.Optimizer(model, optax.adamw(0.01, 0.9), wrt=nnx.Param)  # the tutorial's
    images, labels = _batches(steps)
    for i in range(steps):
        train_step(model, optimizer, {"image": images[i], "label": labels[i]})
    return optimizer


def _leaves_equal(a, b):
    return [bool(np.array_equal(x, y)) for x, y in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]


def test_the_tutorials_unchanged_step_trains_scores_and_other_params_when_asked():
    model = snnx.sparsify(CNN(nnx.Rngs(0)), "edge_popup", rng=1, sparsity=0.5,
                          other_params="trained")
    frozen0, scores0 = _pure(model, snnx.Frozen), _pure(model, snnx.Score)
    others = nnx.All(nnx.Param, nnx.Not(snnx.Score))
    others0 = _pure(model, others)
    # the kernels are frozen; biases and the BatchNorm's scale and bias stay params
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model, snnx.Frozen))} == {
        ("conv", "kernel"), ("linear", "kernel")}
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model, others))} == {
        ("conv", "bias"), ("linear", "bias"), ("norm", "scale"), ("norm", "bias")}
    _train(model)
    assert all(_leaves_equal(frozen0, _pure(model, snnx.Frozen)))       # never changed
    assert not any(_leaves_equal(scores0, _pure(model, snnx.Score)))    # trained
    assert not any(_leaves_equal(others0, _pure(model, others)))        # trained
    masks = snnx.hard_masks(model)
    assert int(masks["conv"]["kernel"].sum()) == 36  # half of 3 * 3 * 1 * 8
    assert int(masks["linear"]["kernel"].sum()) == 392 * 10 // 2
    with pytest.raises(ValueError, match="other_params='trained'"):
        snnx.export_ticket(model, "unused.npz")


def test_other_params_are_frozen_by_default_and_the_freeze_is_named():
    with pytest.warns(UserWarning, match=r"freezes 4 param\(s\).*conv/bias.*norm/scale"):
        model = snnx.sparsify(CNN(nnx.Rngs(0)), "edge_popup", rng=1, sparsity=0.5)
    assert nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(snnx.Score)))) == {}
    frozen0 = _pure(model, snnx.Frozen)
    _train(model, steps=2)
    assert all(_leaves_equal(frozen0, _pure(model, snnx.Frozen)))
    assert float(model.norm.scale[...].min()) == 1.0  # the BatchNorm scale stayed at init
    with pytest.raises(ValueError, match="other_params must be"):
        snnx.sparsify(CNN(nnx.Rngs(0)), "edge_popup", rng=1, sparsity=0.5, other_params="yes")
    with pytest.raises(ValueError, match="trains every param"):
        snnx.sparsify(CNN(nnx.Rngs(0)), "supermask_weights", rng=1, sparsity=0.5,
                      other_params="frozen")


def test_masks_of_an_nnx_optimizer_is_shaped_like_the_params():
    model = CNN(nnx.Rngs(0))
    tx = sparsejax.sparse_tx("rigl", optax.sgd(0.05, momentum=0.9), sparsity=0.75,
                             update_every=2, end_step=4)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.update(model, sparsejax.zero_pruned(nnx.state(model, nnx.Param), optimizer.opt_state))

    @nnx.jit
    def step(model, optimizer, batch):
        grads = nnx.grad(lambda m: loss_fn(m, batch)[0])(model)
        optimizer.update(model, grads)

    images, labels = _batches(4)
    for i in range(4):
        step(model, optimizer, {"image": images[i], "label": labels[i]})
    masks = sparsejax.masks_of(optimizer.opt_state)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert type(masks) is dict
    assert jax.tree.structure(masks) == jax.tree.structure(params)
    for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params), strict=True):
        assert m.dtype == bool and m.shape == p.shape
        assert not np.any(np.asarray(p)[~np.asarray(m)])
    kernels = [masks["conv"]["kernel"], masks["linear"]["kernel"]]
    assert sum(int(m.sum()) for m in kernels) == round(0.25 * sum(m.size for m in kernels))


def test_sparsify_refuses_a_bad_rng_clearly():
    with pytest.raises(ValueError, match=r"rng must be an int or a PRNG key .*'abc'"):
        snnx.sparsify(CNN(nnx.Rngs(0)), "edge_popup", rng="abc", sparsity=0.5)


@pytest.mark.parametrize("name", ["edge_popup", "biprop", "gates"])
def test_a_sparsity_that_empties_every_kernel_warns_for_score_methods(name):
    options = {"sparsity": 0.99999, "other_params": "frozen"}
    if name == "gates":
        options["total_steps"] = 10
    with pytest.warns(UserWarning, match=r"keeps no weight in 2 prunable layer\(s\) "
                                         r"\(conv/kernel, linear/kernel\)"):
        snnx.sparsify(CNN(nnx.Rngs(0)), name, rng=1, **options)
