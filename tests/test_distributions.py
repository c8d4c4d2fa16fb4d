import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import layer_densities, num_kept, prunable_except, select_masks
from sparsejax.core.distributions import kept_counts


def lenet_params():
    return {
        "Dense_0": {"kernel": jnp.zeros((784, 300)), "bias": jnp.zeros(300)},
        "Dense_1": {"kernel": jnp.zeros((300, 100)), "bias": jnp.zeros(100)},
        "Dense_2": {"kernel": jnp.zeros((100, 10)), "bias": jnp.zeros(10)},
    }


def kernel_densities(d):
    return [d[f"Dense_{i}"]["kernel"] for i in range(3)]


def test_erk_three_layers_by_hand():
    # Total prunable 235200 + 30000 + 1000 = 266200; density 0.1 keeps 26620.
    # ERK raw densities sum(shape)/prod(shape): 1084/235200, 400/30000, 110/1000.
    # eps = 26620 / (1084 + 400 + 110) = 16.70 makes the last layer 16.70 * 0.11 > 1,
    # so it becomes dense (1000 kept) and eps = (26620 - 1000) / (1084 + 400) is solved
    # again: the first layer keeps 25620 * 1084 / 1484 = 18714.34, the second
    # 25620 * 400 / 1484 = 6905.66; largest remainder gives the missing one to layer 2.
    d = layer_densities(lenet_params(), 0.1, "erk")
    assert kernel_densities(d) == [18714 / 235200, 6906 / 30000, 1.0]
    assert d["Dense_0"]["bias"] == 1.0
    kept = 18714 + 6906 + 1000
    assert kept == num_kept(0.1, 266200)


def test_erdos_renyi_by_hand():
    # raw (n_in + n_out) / (n_in n_out): 1084/235200, 400/30000, 110/1000, as for dense
    # layers ERK equals ER; a conv kernel differs (kernel dims ignored by ER).
    conv = {"c": jnp.zeros((3, 3, 16, 32)), "d": jnp.zeros((512, 10))}
    er = layer_densities(conv, 0.2, "erdos_renyi")
    # eps = 0.2 * 9728 / ((48/512) * 4608 + (522/5120) * 5120) = 1945.6 / 954
    eps = round(0.2 * 9728) / (48 / 512 * 4608 + 522 / 5120 * 5120)
    expected_c = eps * 48 / 512 * 4608
    assert abs(er["c"] * 4608 - expected_c) <= 1.0
    assert er["c"] * 4608 + er["d"] * 5120 == round(0.2 * 9728)


def test_uniform_and_totals_are_exact_for_many_densities():
    params = lenet_params()
    for distribution in ("uniform", "erk", "erdos_renyi"):
        for density in (0.0, 0.013, 0.05, 0.2, 0.5, 0.97, 1.0):
            d = layer_densities(params, density, distribution)
            sizes = [235200, 30000, 1000]
            kept = sum(round(x * n) for x, n in zip(kernel_densities(d), sizes, strict=True))
            assert kept == num_kept(density, 266200), (distribution, density)
            assert all(0.0 <= x <= 1.0 for x in kernel_densities(d))


def test_overrides_fix_a_leaf_and_the_rest_shares_the_budget():
    d = layer_densities(lenet_params(), 0.1, "uniform", overrides={"Dense_2/kernel": 1.0})
    assert d["Dense_2"]["kernel"] == 1.0
    assert d["Dense_0"]["kernel"] * 235200 + d["Dense_1"]["kernel"] * 30000 == 26620 - 1000


def test_prunable_filter_keeps_layers_dense():
    d = layer_densities(lenet_params(), 0.1, "uniform", prunable=prunable_except("^Dense_0/"))
    assert d["Dense_0"]["kernel"] == 1.0
    assert d["Dense_1"]["kernel"] * 30000 + d["Dense_2"]["kernel"] * 1000 == num_kept(0.1, 31000)


def test_global_uses_one_threshold():
    params = {"a": jnp.arange(10.0).reshape(2, 5), "b": jnp.arange(10.0, 14.0).reshape(2, 2)}
    d = layer_densities(params, 0.5, "global")  # keep 7 of 14: 10..13 and 7, 8, 9
    assert d == {"a": 0.3, "b": 1.0}


def test_select_masks_matches_densities_under_jit():
    params = jax.random.normal(jax.random.PRNGKey(0), (3, 40, 30))
    params = {"a": params[0], "b": params[1], "c": params[2, :, :5], "bias": jnp.ones(30)}
    for distribution in ("uniform", "erk", "global"):
        masks = jax.jit(lambda s, dist=distribution: select_masks(s, 0.3, dist))(params)
        total = sum(int(masks[k].sum()) for k in "abc")
        assert total == num_kept(0.3, 1200 + 1200 + 200), distribution
        assert bool(masks["bias"].all())
        d = layer_densities(params, 0.3, distribution, scores=params)
        for k in "abc":
            assert int(masks[k].sum()) == round(d[k] * params[k].size)


def test_errors():
    with pytest.raises(ValueError, match="unknown sparsity distribution 'erk2'"):
        layer_densities(lenet_params(), 0.1, "erk2")
    with pytest.raises(ValueError, match="density must lie in"):
        layer_densities(lenet_params(), 1.1, "erk")
    with pytest.raises(ValueError, match="names no leaf"):
        layer_densities(lenet_params(), 0.1, "erk", overrides={"Dense_9/kernel": 0.5})
    with pytest.raises(ValueError, match="does not prune"):
        layer_densities(lenet_params(), 0.1, "erk", overrides={"Dense_0/bias": 0.5})
    with pytest.raises(ValueError, match="cannot hold"):
        layer_densities(lenet_params(), 0.01, "erk", overrides={"Dense_0/kernel": 0.5})


def test_returns_python_floats_for_abstract_params():
    abstract = jax.eval_shape(lenet_params)
    d = layer_densities(abstract, 0.1, "erk")
    assert isinstance(d["Dense_0"]["kernel"], float)
    assert np.isclose(d["Dense_0"]["kernel"], 18714 / 235200)


def test_a_density_that_empties_a_prunable_layer_warns_naming_it():
    import optax

    import sparsejax

    params = {"fc1": {"kernel": jnp.ones((784, 300)), "bias": jnp.zeros(300)},
              "head": {"kernel": jnp.ones((300, 10))}}
    for distribution in ("erk", "uniform", "global"):
        with pytest.warns(UserWarning, match=r"keeps no weight in 2 prunable layer\(s\) "
                                             r"\(fc1/kernel, head/kernel\)"):
            state = sparsejax.static(optax.sgd(0.1), sparsity=0.999999,
                                     distribution=distribution).init(
                params, jax.random.PRNGKey(0))
        assert int(state.masks["fc1"]["kernel"].sum()) == 0
    # An override of 0 asks for an empty layer: no warning for it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept_counts(params, 0.5, "uniform", overrides={"head/kernel": 0.0})
