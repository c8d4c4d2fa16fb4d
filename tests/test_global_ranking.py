"""One ranking across layers (JaxPruner's global saliency / global magnitude): every
registered method that chooses masks by score takes ``distribution="global"`` (the gates
rank their gate parameters globally by construction; dense has no mask)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_errors import OPTIONS
from toy_mlp import batches, mlp_loss, mlp_params

import sparsejax
from sparsejax import InitContext, stateless_loss

WITHOUT = {"dense", "gates"}


def test_every_score_method_takes_distribution_global():
    takes = {name for name, builder in sparsejax.METHODS.items()
             if "distribution" in inspect.signature(builder).parameters}
    assert takes == set(sparsejax.METHODS) - WITHOUT


@pytest.mark.parametrize("name", sorted(set(sparsejax.METHODS) - WITHOUT))
def test_global_builds_and_inits(name):
    options = {**OPTIONS[name], "distribution": "global"}
    method = sparsejax.get_method(name, optax.sgd(0.1), **options)
    xs, ys = batches(1)
    context = InitContext(stateless_loss(mlp_loss), ((xs[0], ys[0]),))
    state = jax.eval_shape(lambda p, r: method.init(p, r, context=context),
                           mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    assert jax.tree_util.tree_structure(state.masks) == jax.tree_util.tree_structure(
        mlp_params(jax.random.PRNGKey(0)))


def test_global_magnitude_is_one_top_k_over_both_kernels():
    params = mlp_params(jax.random.PRNGKey(0))
    for name in ("magnitude", "ste_magnitude"):
        method = sparsejax.get_method(name, optax.sgd(0.1), sparsity=0.8,
                                      distribution="global")
        masks = method.init(params, jax.random.PRNGKey(1)).masks
        kernels = [params[k]["kernel"] for k in ("Dense_0", "Dense_1")]
        joint = sparsejax.topk_mask(jnp.concatenate([jnp.abs(k).ravel() for k in kernels]),
                                    count=round(0.2 * (320 + 64)))
        got = np.concatenate([np.asarray(masks[k]["kernel"]).ravel()
                              for k in ("Dense_0", "Dense_1")])
        np.testing.assert_array_equal(got, joint)
