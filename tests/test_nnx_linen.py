"""Score methods in the user's own Flax NNX and linen models (sparsejax.nnx, sparsejax.linen)
against the native engine: the same init, the same batches, the same masks."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
import sparsejax.linen as slinen
import sparsejax.nnx as snnx
from sparsejax.core._tree import path_str
from sparsejax.io.tickets import tree_digest

KEY = jax.random.PRNGKey(7)
LR = 0.5
STEPS = 5
OPTIONS = {
    "edge_popup": {"sparsity": 0.5},
    # a density ramp over the first 3 steps: the step counter matters
    "biprop": {"sparsity": 0.5, "ramp_epochs": 1.0, "batches_per_epoch": 3},
    "supermask_weights": {"sparsity": 0.5},
    # noise from the step, a controller, clipped gate parameters
    "gates": {"sparsity": 0.5, "total_steps": STEPS, "score_bounds": (-1.0, 1.5),
              "sigma": 0.3},
}
KEPT = {"fc1": 160, "fc2": 32}  # num_kept(0.5, 20 * 16), num_kept(0.5, 16 * 4)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(20, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(4, name="fc2")(jax.nn.relu(nn.Dense(16, name="fc1")(x)))


LINEN = LinenMLP()


def apply(params, x):
    return LINEN.apply({"params": params}, x)


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def tx():
    return optax.sgd(LR, momentum=0.9)


def batches():
    keys = jax.random.split(jax.random.PRNGKey(3), STEPS)
    return [(jax.random.normal(k, (16, 20)), jnp.arange(16) % 4) for k in keys]


def pure(model, kind):
    return nnx.to_pure_dict(nnx.state(model, kind))


def initial_params():
    return nnx.to_pure_dict(nnx.state(NnxMLP(nnx.Rngs(0)), nnx.Param))


@functools.cache
def method_for(name):
    """One method object per name, so that its jitted init compiles once."""
    return sparsejax.get_method(name, optax.identity(), **OPTIONS[name])


@functools.cache
def native(name):
    """The native engine's state after STEPS steps from the same params and key."""
    method = sparsejax.get_method(name, tx(), **OPTIONS[name])
    state = jax.jit(method.init)(initial_params(), KEY)
    step = jax.jit(sparsejax.make_train_step(
        method, sparsejax.stateless_loss(lambda p, b: ce(apply(p, b[0]), b[1]))))
    for batch in batches():
        state, _ = step(state, batch)
    return method, state


def flat(tree):
    return {path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_masks_and_scores(method, state, masks, scores_by_path):
    native_masks = flat(method.hard_masks(state))
    ours = flat(masks)
    assert native_masks.keys() == ours.keys()
    for path in native_masks:
        np.testing.assert_array_equal(ours[path], native_masks[path], err_msg=path)
    native_scores = {p: s for p, s in flat(state.scores).items() if s.size}
    assert native_scores.keys() == scores_by_path.keys()
    for path, s in native_scores.items():
        np.testing.assert_allclose(scores_by_path[path], s, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- NNX


@functools.cache  # shared by the tests, which leave the model as they found it
def nnx_train(name, *, own_optimizer):
    trains_weights = name == "supermask_weights"
    model = snnx.sparsify(NnxMLP(nnx.Rngs(0)), method_for(name), rng=KEY,
                          other_params=None if trains_weights else "frozen")
    trains_weights = name == "supermask_weights"
    if own_optimizer:
        optimizer = snnx.Optimizer(model, tx())
    else:
        optimizer = nnx.Optimizer(model, tx(), wrt=snnx.Trainable if trains_weights
                                  else snnx.Score)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return ce(model(x), y) + snnx.penalty(model)

        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, snnx.Trainable))(model)
        optimizer.update(model, grads)
        if not own_optimizer:
            snnx.update(model)

    weights0 = jax.tree.map(jnp.copy, pure(model, nnx.Param if trains_weights else snnx.Frozen))
    scores0 = jax.tree.map(jnp.copy, pure(model, snnx.Score))
    for x, y in batches():
        train_step(model, optimizer, x, y)
    return model, weights0, scores0


def nnx_scores(model):
    return {p.replace("_scores", "").replace("_gates", ""): np.asarray(v)
            for p, v in flat(pure(model, snnx.Score)).items()}


@pytest.mark.parametrize("name,own_optimizer", [
    ("edge_popup", False), ("biprop", True), ("supermask_weights", True), ("gates", False)])
def test_nnx_matches_native_engine(name, own_optimizer):
    model, weights0, scores0 = nnx_train(name, own_optimizer=own_optimizer)
    method, state = native(name)
    trains_weights = name == "supermask_weights"
    # (a) the frozen weights are bitwise what they were; supermask_weights trains them
    weights = pure(model, nnx.Param if trains_weights else snnx.Frozen)
    same = [bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(weights0), jax.tree.leaves(weights), strict=True)]
    assert not any(same) if trains_weights else all(same)
    if not trains_weights:
        # nothing but the scores (a kind of nnx.Param) is left to train
        assert pure(model, nnx.All(nnx.Param, nnx.Not(snnx.Score))) == {}
    # (b) the scores moved
    assert not all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(scores0), jax.tree.leaves(pure(model, snnx.Score)),
        strict=True))
    # (c) the native engine's masks (exactly), scores, weights and bookkeeping
    assert int(model.sparsejax.step[...]) == int(state.step) == STEPS
    assert_same_masks_and_scores(method, state, snnx.hard_masks(model), nnx_scores(model))
    for ours, theirs in zip(jax.tree.leaves(snnx.effective_params(model)),
                            jax.tree.leaves(method.effective_params(state)), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    if name == "gates":
        np.testing.assert_allclose(model.sparsejax.lam[...], state.extra["lam"], rtol=1e-5)


@pytest.mark.parametrize("name", ["edge_popup", "gates"])
def test_nnx_forward_uses_the_effective_weights(name):
    model = snnx.sparsify(NnxMLP(nnx.Rngs(0)), method_for(name), rng=KEY)
    x = batches()[0][0]
    frozen = pure(model, snnx.Frozen)
    method = model.sparsejax.method
    state = snnx.sparse_state(model)
    expected = apply(method.materialize(state, method.trainables(state)), x)
    np.testing.assert_allclose(model(x), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(model(x), apply(frozen, x), atol=1e-3)  # not the dense kernels
    # the frozen kernels are put back after the call
    assert tree_digest(pure(model, snnx.Frozen)) == tree_digest(frozen)
    # split / merge keep the sparse model, also inside a plain jax.jit
    graphdef, variables = nnx.split(model)
    np.testing.assert_array_equal(nnx.merge(graphdef, variables)(x), model(x))
    merged = jax.jit(lambda v, x: nnx.merge(graphdef, v)(x))(variables, x)
    np.testing.assert_allclose(merged, model(x), rtol=1e-6, atol=1e-6)


def test_nnx_paths_and_filters():
    model = snnx.sparsify(NnxMLP(nnx.Rngs(0)), "edge_popup", rng=KEY, sparsity=0.5)
    assert isinstance(model, NnxMLP)
    scores = nnx.to_flat_state(nnx.state(model, snnx.Score))
    assert sorted(path for path, _ in scores) == [("fc1", "kernel_scores"),
                                                  ("fc2", "kernel_scores")]
    frozen = sorted(path for path, _ in nnx.to_flat_state(nnx.state(model, snnx.Frozen)))
    assert frozen == [("fc1", "bias"), ("fc1", "kernel"), ("fc2", "bias"), ("fc2", "kernel")]
    gates = snnx.sparsify(NnxMLP(nnx.Rngs(0)), "gates", rng=KEY, sparsity=0.5)
    assert sorted(p for p, _ in nnx.to_flat_state(nnx.state(gates, snnx.Gate))) == [
        ("fc1", "kernel_gates"), ("fc2", "kernel_gates")]
    with pytest.raises(ValueError, match="already sparsified"):
        snnx.sparsify(model, "edge_popup", rng=KEY, sparsity=0.5)
    with pytest.raises(ValueError, match="no outside-optimizer form.*sparse_tx"):
        snnx.sparsify(NnxMLP(nnx.Rngs(0)), "static", rng=KEY, sparsity=0.5)
    with pytest.raises(ValueError, match="is not sparsified"):
        snnx.hard_masks(NnxMLP(nnx.Rngs(0)))


@pytest.mark.parametrize("name", ["edge_popup", "gates"])
def test_nnx_hard_mask_evaluation_and_ticket(name, tmp_path):
    model, _, _ = nnx_train(name, own_optimizer=False)
    method, state = native(name)
    x = batches()[0][0]
    plain = snnx.effective_model(model)
    assert type(plain) is NnxMLP and not hasattr(plain, "sparsejax")
    kept = {layer: int(jnp.count_nonzero(getattr(plain, layer).kernel[...])) for layer in KEPT}
    if name == "edge_popup":
        assert kept == KEPT  # (d) exact kept counts
    else:  # the gates' global top-k of open gates: at most num_kept(0.5, 384)
        native_masks = method.hard_masks(state)
        assert kept == {layer: int(native_masks[layer]["kernel"].sum()) for layer in KEPT}
        assert sum(kept.values()) <= 192
    # eval mode runs the hard masks without noise
    np.testing.assert_allclose(nnx.view(model, deterministic=True)(x), plain(x),
                               rtol=1e-6, atol=1e-6)
    model.eval()
    np.testing.assert_allclose(model(x), plain(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model(x), model(x))
    model.train()
    if name == "gates":  # the training forward draws noise
        assert not np.allclose(model(x), plain(x), atol=1e-4)
    # (e) the ticket: the same frozen weights (same init and key), the trained masks
    summary = snnx.export_ticket(model, tmp_path / "ticket.npz")
    assert summary["kept"] == sum(kept.values()) + 16 + 4  # biases stay dense
    fresh = snnx.sparsify(NnxMLP(nnx.Rngs(0)), method_for(name), rng=KEY)
    loaded = snnx.load_ticket(fresh, tmp_path / "ticket.npz")
    assert tree_digest(pure(loaded, nnx.Param)) == tree_digest(
        pure(plain, nnx.Param))
    np.testing.assert_array_equal(loaded(x), plain(x))
    other = snnx.sparsify(NnxMLP(nnx.Rngs(0)), method_for(name), rng=jax.random.PRNGKey(8))
    with pytest.raises(ValueError, match="frozen weights differ"):
        snnx.load_ticket(other, tmp_path / "ticket.npz")


def test_nnx_ticket_refuses_trained_weights(tmp_path):
    model = snnx.sparsify(NnxMLP(nnx.Rngs(0)), method_for("supermask_weights"), rng=KEY)
    with pytest.raises(ValueError, match="trains the weights"):
        snnx.export_ticket(model, tmp_path / "t.npz")


# --------------------------------------------------------------------------- linen


def linen_train(name):
    # the NNX model's init, which LinenMLP's params match leaf for leaf
    sparse = slinen.sparsify(method_for(name), LINEN.apply, initial_params(), rng=KEY)
    if name in ("edge_popup", "supermask_weights"):  # flax's own TrainState
        from flax.training import train_state

        state = train_state.TrainState.create(apply_fn=sparse.apply_fn,
                                              params=slinen.trainables(sparse), tx=tx())
        variables = lambda state: {"params": state.params}  # noqa: E731
    else:
        state = slinen.create_train_state(sparse, tx())
        variables = lambda state: state.variables  # noqa: E731

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            v = {**variables(state), "params": params}
            return ce(state.apply_fn(v, x), y) + slinen.penalty(sparse, v)

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    first = state.params
    for x, y in batches():
        state = train_step(state, x, y)
    return sparse, state, variables(state), first


@pytest.mark.parametrize("name", ["edge_popup", "biprop", "supermask_weights", "gates"])
def test_linen_matches_native_engine(name, tmp_path):
    sparse, state, variables, first = linen_train(name)
    method, native_state = native(name)
    assert int(state.step) == STEPS
    # (a) the frozen weights live in apply_fn, untouched; supermask_weights trains them
    if name == "supermask_weights":
        assert not jnp.array_equal(state.params["params"]["fc1"]["kernel"],
                                   first["params"]["fc1"]["kernel"])
        scores = state.params["scores"]
    else:
        assert tree_digest(sparse.state.params) == tree_digest(
            jax.jit(method.init)(initial_params(), KEY).params)
        scores = state.params
    # (b) the scores moved
    assert not all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(first), jax.tree.leaves(state.params), strict=True))
    # (c) the native engine's masks (exactly) and scores
    masks = slinen.hard_masks(sparse, variables)
    assert_same_masks_and_scores(method, native_state, masks,
                                 {p: s for p, s in flat(scores).items() if s.size})
    # (d) evaluation with the hard masks: the model's own apply, exact counts
    params = slinen.effective_params(sparse, variables)
    x = batches()[0][0]
    if name != "gates":
        assert {k: int(jnp.count_nonzero(params[k]["kernel"])) for k in KEPT} == KEPT
        # the training forward is the effective one, not the dense kernels
        np.testing.assert_allclose(state.apply_fn(variables, x), apply(params, x),
                                   rtol=1e-5, atol=1e-5)
    if name == "supermask_weights":
        return
    # (e) the ticket round trip
    slinen.export_ticket(sparse, variables, tmp_path / "t.npz")
    fresh = slinen.sparsify(method_for(name), LINEN.apply, initial_params(), rng=KEY)
    loaded = slinen.load_ticket(fresh, tmp_path / "t.npz")
    assert tree_digest(loaded) == tree_digest(params)


@pytest.mark.parametrize("name", ["gates", "biprop"])
def test_linen_methods_that_read_the_step_need_the_collection(name):
    sparse = slinen.sparsify(method_for(name), LINEN.apply, initial_params(), rng=KEY)
    with pytest.raises(ValueError, match="reads the step"):
        sparse.apply_fn({"params": slinen.trainables(sparse)}, jnp.ones((1, 20)))


def test_the_outside_pieces_are_a_field_of_the_method():
    """A method rebuilt with ``_replace`` (here a wrapped ``init``) keeps its outside-loop
    pieces and so still drives an NNX model; a weight-training method has none."""
    from sparsejax.methods.outside import outside_loop

    method = sparsejax.edge_popup(optax.sgd(0.1), sparsity=0.5)
    wrapped = method._replace(init=lambda *args, **kwargs: method.init(*args, **kwargs))
    assert wrapped.outside is method.outside
    assert outside_loop(wrapped).scores_layout == "by_path"
    model = snnx.sparsify(NnxMLP(nnx.Rngs(0)), wrapped, rng=KEY, other_params="frozen")
    assert model(jnp.ones((2, 20))).shape == (2, 4)
    with pytest.raises(ValueError, match="no outside-optimizer form"):
        outside_loop(sparsejax.static(optax.sgd(0.1), sparsity=0.5))
