"""Misuse gets an error that names the problem (issue #18): grads of another structure,
Flax NNX paths, masks that are not binary, params with nothing to prune, and a failed
host check under ``jit`` that prints nothing else."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from toy_mlp import batches, mlp_loss, mlp_params

import sparsejax
from sparsejax import get_method, stateless_loss
from sparsejax.core._tree import leaf_paths, path_str
from sparsejax.methods import InitContext


def _mlp_apply(params, model_state, x):
    del model_state
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


# Options with which every registered method builds on the toy MLP.
OPTIONS = {
    "dense": {},
    "static": dict(sparsity=0.8),
    "magnitude": dict(sparsity=0.8),
    "gradual_magnitude": dict(sparsity=0.8, total_steps=10),
    "random_prune": dict(sparsity=0.8),
    "snip": dict(sparsity=0.8),
    "grasp": dict(sparsity=0.8),
    "synflow": dict(sparsity=0.8, apply_fn=_mlp_apply, input_shape=(20,)),
    "set": dict(sparsity=0.8, update_every=3),
    "rigl": dict(sparsity=0.8, update_every=3, total_steps=10),
    "snfs": dict(sparsity=0.8, update_every=3, total_steps=10),
    "edge_popup": dict(sparsity=0.5),
    "biprop": dict(sparsity=0.5),
    "supermask_weights": dict(sparsity=0.5),
    "gates": dict(sparsity=0.8),
    "ste_magnitude": dict(sparsity=0.8),
    "ste_random": dict(sparsity=0.8, update_every=3),
    "sr_ste": dict(sparsity=0.5, pattern="2:4"),
}


def _method_and_state(name):
    method = get_method(name, optax.sgd(0.1), **OPTIONS[name])
    xs, ys = batches(1)
    context = InitContext(stateless_loss(mlp_loss), ((xs[0], ys[0]),))
    # abstract: the check runs while tracing, so shapes are all it needs
    state = jax.eval_shape(lambda p, r: method.init(p, r, context=context),
                           mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    return method, state


def _updates(method):
    named = [("update", method.update)]
    if method.phases is not None:
        named += [("phases.train", method.phases.train), ("phases.move", method.phases.move)]
    return named


def test_every_registered_method_is_covered():
    assert set(sparsejax.METHODS) <= set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_grads_of_another_structure_name_the_differing_leaves(name):
    """RigL's regrow used to fail with ``IndexError: list index out of range``; every
    update and phase now fails while tracing, naming the leaves."""
    method, state = _method_and_state(name)
    grads = jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, t.dtype),
                                   method.trainables(state))
    paths = leaf_paths(grads)
    missing = paths[0]
    fewer = jax.tree_util.tree_map_with_path(
        lambda p, g: None if path_str(p) == missing else g, grads)
    for _, update in _updates(method):
        with pytest.raises(ValueError, match=(
                rf"grads do not match trainables: missing leaves \['{missing}'\] "
                rf"\(trainables: {len(paths)} leaves, grads: {len(paths) - 1} lea(f|ves)\)")):
            jax.eval_shape(update, state, fewer)
        extra = {"grads": grads, "more": jnp.zeros(3)}
        with pytest.raises(ValueError, match=r"unexpected leaves \[.*'grads/"):
            jax.eval_shape(update, state, extra)
        wrong_shape = jax.tree_util.tree_map_with_path(
            lambda p, g: jnp.zeros((1,) + g.shape) if path_str(p) == missing else g, grads)
        with pytest.raises(ValueError, match=rf"leaf '{missing}' has shape"):
            jax.eval_shape(update, state, wrong_shape)


def test_the_grads_check_adds_nothing_to_the_step():
    method, state = _method_and_state("rigl")
    grads = jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, t.dtype),
                                   method.trainables(state))
    for _, update in _updates(method):
        unchecked = update.__wrapped__
        assert str(jax.make_jaxpr(update)(state, grads)) == str(
            jax.make_jaxpr(unchecked)(state, grads))
    # a Method built from a built one's fields checks once, not twice
    again = sparsejax.Method(*method)
    assert again.update is method.update and again.phases.move is method.phases.move


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)])
        self.head = nnx.Linear(16, 4, rngs=rngs)


def _nnx_forms():
    state = nnx.state(_NnxNet(nnx.Rngs(0)), nnx.Param)
    # the State of Variables (nnx.state, what nnx.Optimizer hands to tx.init) and the pure
    # arrays (what nnx.Optimizer hands to tx.update)
    from sparsejax.integrations.optax_form import (
        _pure,  # nnx.as_pure, or nnx.pure before flax 0.12.7
    )

    return {"variables": state, "pure": _pure(state), "pure_dict": nnx.to_pure_dict(state)}


def _leaf(tree, *keys):
    for key in keys:
        tree = tree[key]
    return tree.get_value() if isinstance(tree, nnx.Variable) else tree


def test_nnx_paths_are_the_ones_nnx_state_shows():
    """The same answers for the State of Variables (``nnx.state``, what ``nnx.Optimizer``
    hands to ``tx.init``) and the pure arrays (what it hands to ``tx.update``)."""
    for form, params in _nnx_forms().items():
        assert leaf_paths(params) == ["embed/embedding", "head/bias", "head/kernel",
                                      "layers/0/bias", "layers/0/kernel", "layers/1/bias",
                                      "layers/1/kernel"], form
        prunable = sparsejax.prunable_leaves(params)
        assert not _leaf(prunable, "embed", "embedding")  # not judged by the name 'value'
        assert _leaf(prunable, "head", "kernel") and not _leaf(prunable, "head", "bias")

        densities = sparsejax.layer_densities(params, 0.3, "erk",
                                              overrides={"head/kernel": 1.0})
        assert _leaf(densities, "head", "kernel") == 1.0
        assert _leaf(densities, "embed", "embedding") == 1.0
        assert _leaf(densities, "layers", 0, "kernel") < 1.0

        masks = sparsejax.select_masks(params, 0.3, "erk", overrides={"head/kernel": 1.0})
        assert bool(jnp.all(_leaf(masks, "head", "kernel")))
        kept = int(jnp.sum(_leaf(masks, "layers", 0, "kernel")))
        assert kept == round(_leaf(densities, "layers", 0, "kernel") * 8 * 16)

        method = get_method("static", optax.sgd(0.1), sparsity=0.7,
                            overrides={"layers/0/kernel": 0.5})
        state = method.init(params, jax.random.PRNGKey(0))
        assert float(jnp.mean(_leaf(state.masks, "layers", 0, "kernel"))) == 0.5
        report = {row.path for row in sparsejax.sparsity_report(state.masks)}
        assert {"layers/0/kernel", "head/kernel"} <= report


def test_apply_masks_rejects_masks_that_are_not_binary():
    params = {"Dense_0": {"kernel": jnp.ones((2, 2))}}
    for value, shown in ((0.5, "0.5"), (jnp.nan, "nan")):
        masks = {"Dense_0": {"kernel": jnp.array([[1.0, value], [0.0, 1.0]])}}
        with pytest.raises(ValueError, match=(
                rf"masks must be bool or hold only 0 and 1: leaf 'Dense_0/kernel' holds "
                rf".*{shown}")):
            sparsejax.apply_masks(params, masks)
    # 0/1 numbers and bools are masks
    as_numbers = sparsejax.apply_masks(params, {"Dense_0": {"kernel": jnp.eye(2)}})
    as_bools = sparsejax.apply_masks(params, {"Dense_0": {"kernel": jnp.eye(2, dtype=bool)}})
    np.testing.assert_array_equal(as_numbers["Dense_0"]["kernel"], np.eye(2))
    np.testing.assert_array_equal(as_bools["Dense_0"]["kernel"], np.eye(2))


def test_layer_densities_without_a_prunable_leaf_is_an_error():
    with pytest.raises(ValueError, match=r"no leaf of the params is prunable.*\['bias'\]"):
        sparsejax.layer_densities({"bias": jnp.zeros(3)}, 0.1, "erk")
    params = mlp_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no leaf of the params is prunable"):
        sparsejax.layer_densities(params, 0.1, "uniform", prunable=lambda path, leaf: False)
