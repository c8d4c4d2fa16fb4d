"""Strong lottery tickets: Edge-Popup, binarized multi-prize tickets, supermask + weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_mlp import batches, mlp_loss, mlp_params

from sparsejax import get_method, make_train_step, num_kept, stateless_loss
from sparsejax.core import topk_search
from sparsejax.harness.training.loop import TrainConfig, build_method
from sparsejax.methods.strong import biprop, edge_popup, supermask_weights
from sparsejax.methods.strong_init import fans, init_scores, init_weights
from sparsejax.methods.supermask import binarize, binarized_supermask


def lenet_params(key, bias=True):
    shapes = {"fc1": (196, 30), "fc2": (30, 20), "head": (20, 10)}
    params = {}
    for i, (name, shape) in enumerate(shapes.items()):
        params[name] = {"kernel": jax.random.normal(jax.random.fold_in(key, i), shape) * 0.05}
        if bias:
            params[name]["bias"] = jnp.zeros(shape[-1])
    return params


def sgd_momentum_wd(lr=0.1):
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9))


def bits(x):
    return np.asarray(x).view(np.uint8)


# --------------------------------------------------------------------------- registry


def test_methods_are_registered_and_reach_the_harness():
    for name in ("edge_popup", "biprop", "supermask_weights"):
        assert get_method(name, optax.sgd(0.1), sparsity=0.5).name == name
    config = TrainConfig(method="biprop", sparsity=0.8,
                         method_options={"weight_init": "signed_constant", "scope": "global",
                                         "ramp_epochs": 2})
    method = build_method(config, optax.sgd(0.1), total_steps=100, batches_per_epoch=10)
    state = jax.jit(method.init)(lenet_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    # ramp over 20 steps: at step 0 everything is kept
    assert all(bool(m.all()) for m in jax.tree_util.tree_leaves(state.masks))
    with pytest.raises(ValueError, match="unknown option"):
        build_method(TrainConfig(method="edge_popup", sparsity=0.5,
                                 method_options={"prune_rate": 0.5}), optax.sgd(0.1))


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("density", [0.05, 0.1, 0.5, 0.9])
def test_layer_topk_keeps_exact_counts_in_every_layer(density):
    method = edge_popup(optax.sgd(0.1), sparsity=1 - density)
    params = lenet_params(jax.random.PRNGKey(0))
    state = jax.jit(method.init)(params, jax.random.PRNGKey(1))
    for name, layer in state.masks.items():
        kernel = layer["kernel"]
        assert kernel.dtype == jnp.bool_
        assert int(kernel.sum()) == num_kept(1 - (1 - density), kernel.size), name
        assert bool(layer["bias"].all())  # biases are not pruned
    assert sorted(state.scores) == ["fc1/kernel", "fc2/kernel", "head/kernel"]
    assert jax.tree_util.tree_structure(state.masks) == jax.tree_util.tree_structure(params)


def test_global_scope_keeps_exact_total_and_erk_follows_layer_densities():
    from sparsejax import layer_densities

    params = lenet_params(jax.random.PRNGKey(0), bias=False)
    state = edge_popup(optax.sgd(0.1), sparsity=0.8, scope="global").init(
        params, jax.random.PRNGKey(1))
    total = sum(p["kernel"].size for p in params.values())
    kept = sum(int(m["kernel"].sum()) for m in state.masks.values())
    assert kept == num_kept(0.2, total)
    # the global threshold really is one threshold on |score|
    # (in numpy: eager boolean indexing would compile a program per layer shape)
    scores = {n: np.abs(np.asarray(state.scores[f"{n}/kernel"])) for n in params}
    masks = {n: np.asarray(state.masks[n]["kernel"]) for n in params}
    kept_scores = [scores[n][masks[n]] for n in params]
    dropped = [scores[n][~masks[n]] for n in params]
    assert min(float(k.min()) for k in kept_scores) >= max(float(d.max()) for d in dropped)

    erk = edge_popup(optax.sgd(0.1), sparsity=0.8, distribution="erk").init(
        params, jax.random.PRNGKey(1))
    expected = layer_densities(params, 0.2, "erk")
    for name in params:
        size = params[name]["kernel"].size
        assert int(erk.masks[name]["kernel"].sum()) == round(expected[name]["kernel"] * size)


def test_masks_track_the_scores_after_every_update():
    method = edge_popup(sgd_momentum_wd(), sparsity=0.5)
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    state = method.init(mlp_params(jax.random.PRNGKey(0), scale=1.0), jax.random.PRNGKey(1))
    xs, ys = batches(5)
    for i in range(5):
        state, _ = step(state, (xs[i], ys[i]))
        for path, scores in state.scores.items():
            layer, leaf = path.split("/")
            expected = jnp.abs(scores) >= jnp.sort(jnp.abs(scores).ravel())[-num_kept(
                0.5, scores.size)]
            assert bool(jnp.array_equal(state.masks[layer][leaf], expected))
    assert int(state.step) == 5


def test_masks_of_large_leaves_stay_exact_with_the_tracked_top_k(monkeypatch):
    # 6000 scores per leaf, searched as a large leaf is (above 2048 scores here, above
    # SAMPLED_ABOVE in a real run): the sampled search, started each step from the last
    # cuts kept in state.extra; the masks must still be the exact top-k of |scores|.
    monkeypatch.setattr(topk_search, "SAMPLED_ABOVE", topk_search.SAMPLE_SIZE)
    params = {"fc": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (100, 60))}}
    method = edge_popup(optax.sgd(0.5, momentum=0.9), sparsity=0.7)

    def loss(p, batch):
        return jnp.mean((batch @ p["fc"]["kernel"] - 1.0) ** 2)

    step = jax.jit(make_train_step(method, stateless_loss(loss)))
    state = method.init(params, jax.random.PRNGKey(1))
    xs = jax.random.normal(jax.random.PRNGKey(2), (8, 16, 100))
    for i in range(8):
        state, _ = step(state, xs[i])
        scores = np.abs(np.asarray(state.scores["fc/kernel"])).ravel()
        k = num_kept(0.3, scores.size)
        expected = np.zeros(scores.size, bool)
        expected[np.lexsort((np.arange(scores.size), -scores.astype(np.float64)))[:k]] = True
        np.testing.assert_array_equal(np.asarray(state.masks["fc"]["kernel"]).ravel(), expected)
    assert state.extra["topk_cuts"].shape == (1, 2)
    assert bool(jnp.all(jnp.isfinite(state.extra["topk_cuts"])))
    assert float(state.extra["topk_cuts"][0, 1]) > 0  # the sampled search ran: its cut moved


# --------------------------------------------------------------------------- frozen weights


@pytest.mark.parametrize("build", [edge_popup, biprop])
def test_weights_are_bitwise_frozen_after_many_jitted_steps(build):
    method = build(sgd_momentum_wd(), sparsity=0.5)
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    state = method.init(mlp_params(jax.random.PRNGKey(0), scale=1.0), jax.random.PRNGKey(1))
    start = state
    xs, ys = batches(100)
    for i in range(100):
        state, metrics = step(state, (xs[i], ys[i]))
    for a, b in zip(jax.tree_util.tree_leaves(start.params),
                    jax.tree_util.tree_leaves(state.params), strict=True):
        assert np.array_equal(bits(a), bits(b))
    # ...while the scores moved and the subnetwork changed
    assert not np.array_equal(start.scores["Dense_0/kernel"], state.scores["Dense_0/kernel"])
    assert not np.array_equal(start.masks["Dense_0"]["kernel"], state.masks["Dense_0"]["kernel"])
    first = float(mlp_loss(method.effective_params(start), (xs[0], ys[0])))
    assert float(metrics["loss"]) < first


def test_effective_params_equal_the_training_forward_pass():
    for build in (edge_popup, biprop, supermask_weights):
        method = build(optax.sgd(0.1), sparsity=0.7)
        state = method.init(mlp_params(jax.random.PRNGKey(0), scale=1.0), jax.random.PRNGKey(1))
        forward = method.materialize(state, method.trainables(state))
        effective = method.effective_params(state)
        for a, b in zip(jax.tree_util.tree_leaves(forward),
                        jax.tree_util.tree_leaves(effective), strict=True):
            assert np.array_equal(bits(a), bits(b)), build.__name__


# --------------------------------------------------------------------------- inits


def test_signed_constant_and_scaled_inits_match_the_formulas():
    params = {"conv": jnp.zeros((3, 3, 16, 32)), "dense": jnp.zeros((784, 300)),
              "bias": jnp.ones(300)}
    key = jax.random.PRNGKey(3)
    w = init_weights(params, key, "signed_constant")
    assert fans((3, 3, 16, 32)) == (144, 288)
    for name, fan_in in (("conv", 144), ("dense", 784)):
        values = np.unique(np.asarray(w[name]))
        expected = np.float32(math.sqrt(2) / math.sqrt(fan_in))
        assert np.array_equal(values, np.array([-expected, expected]))
        assert abs(float(jnp.mean(w[name] > 0)) - 0.5) < 0.05
    assert np.array_equal(w["bias"], params["bias"])  # not prunable: untouched
    out = init_weights(params, key, "signed_constant", fan_mode="fan_out")
    assert float(jnp.abs(out["dense"]).max()) == pytest.approx(math.sqrt(2 / 300), rel=1e-6)
    scaled = init_weights(params, key, "scaled_signed_constant", density=0.3)
    assert np.allclose(scaled["dense"], w["dense"] / math.sqrt(0.3), rtol=1e-6)
    kaiming = init_weights(params, key, "kaiming_normal")
    assert float(jnp.std(kaiming["dense"])) == pytest.approx(math.sqrt(2 / 784), rel=0.01)
    # the same draw: the signed constant is the sign of the Kaiming-normal draw
    assert np.array_equal(jnp.sign(kaiming["dense"]), jnp.sign(w["dense"]))
    scaled_k = init_weights(params, key, "scaled_kaiming_normal", density=0.25)
    assert np.allclose(scaled_k["dense"], 2 * kaiming["dense"], rtol=1e-6)
    assert init_weights(params, key, "model") is params


def test_score_init_is_kaiming_uniform_with_a_sqrt5():
    params = {"fc": jnp.zeros((400, 300)), "b": jnp.zeros(300)}
    scores = init_scores(params, jax.random.PRNGKey(0))
    assert list(scores) == ["fc"]
    bound = 1 / math.sqrt(400)
    assert float(jnp.abs(scores["fc"]).max()) <= bound
    assert float(jnp.abs(scores["fc"]).max()) > 0.99 * bound
    assert float(jnp.std(scores["fc"])) == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_method_init_draws_weights_from_its_rng():
    params = lenet_params(jax.random.PRNGKey(0), bias=False)
    method = edge_popup(optax.sgd(0.1), sparsity=0.5)
    a = method.init(params, jax.random.PRNGKey(1))
    b = method.init(lenet_params(jax.random.PRNGKey(9), bias=False), jax.random.PRNGKey(1))
    c = method.init(params, jax.random.PRNGKey(2))
    assert np.array_equal(a.params["fc1"]["kernel"], b.params["fc1"]["kernel"])
    assert not np.array_equal(a.params["fc1"]["kernel"], c.params["fc1"]["kernel"])
    assert float(jnp.abs(a.params["fc2"]["kernel"]).max()) == pytest.approx(
        math.sqrt(2 / 30), rel=1e-6)


# --------------------------------------------------------------------------- gradient sign


def toy_problem():
    """One output ``sum(w_eff)``, target 2; the right subnetwork keeps w0 = 2 only."""
    params = {"w": jnp.array([[2.0], [-1.0]])}

    def loss(p, batch):
        del batch
        return (jnp.sum(p["w"]) - 2.0) ** 2

    return params, stateless_loss(loss)


def test_a_negative_score_that_should_win_grows_in_magnitude():
    params, loss_fn = toy_problem()
    method = edge_popup(optax.sgd(0.005), sparsity=0.5, weight_init="model")
    state = method.init(params, jax.random.PRNGKey(0))
    state = state.replace(scores={"w": jnp.array([[-0.1], [0.2]])})
    state = state.replace(masks=method.update(state, jax.tree_util.tree_map(
        jnp.zeros_like, state.scores)).masks)  # masks of these scores
    assert state.masks["w"].ravel().tolist() == [False, True]
    # by hand: w_eff = [0, -1], g = 2 * (-1 - 2) = -6 for each entry;
    # score grad = g * w * sign(s) = -6 * [2, -1] * [-1, 1] = [12, 6]
    grads = jax.grad(lambda s: loss_fn(method.materialize(state, s), state.model_state,
                                       None)[0])(state.scores)
    assert grads["w"].ravel().tolist() == [12.0, 6.0]
    new = method.update(state, grads)
    assert np.allclose(new.scores["w"].ravel(), [-0.16, 0.17])
    # |s0| grew (a sign-less estimator, g * w = -12, would have shrunk it to 0.04)
    assert abs(float(new.scores["w"][0, 0])) > 0.1


def test_all_negative_scores_find_the_right_subnetwork():
    """Every score starts negative: with a wrong sign in the estimator the scores of the
    needed weights would move towards zero and the wrong subnetwork would stay."""
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (16, 1))
    needed = jnp.arange(16) % 2 == 0  # the target uses the even weights only
    x = jax.random.normal(jax.random.fold_in(key, 1), (256, 16))
    y = x @ jnp.where(needed[:, None], w, 0.0)

    def loss(p, batch):
        return jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2)

    method = edge_popup(optax.sgd(0.02, momentum=0.9), sparsity=0.5, weight_init="model")
    state = method.init({"w": w}, jax.random.PRNGKey(1))
    # start from the wrong subnetwork: every score negative, the odd ones largest in |.|
    scores = -jnp.where(needed, 0.01, 0.02)[:, None] * (1 + jnp.arange(16)[:, None] / 100)
    state = state.replace(scores={"w": scores})
    state = state.replace(masks=method.update(state, {"w": jnp.zeros_like(scores)}).masks)
    assert not bool(state.masks["w"].ravel()[needed].any())
    step = jax.jit(make_train_step(method, stateless_loss(loss)))
    for _ in range(200):
        state, metrics = step(state, (x, y))
    assert state.masks["w"].ravel().tolist() == needed.tolist()
    assert float(loss(method.effective_params(state), (x, y))) < 1e-10


# --------------------------------------------------------------------------- biprop


def test_binarized_weights_match_the_formula_by_hand():
    w = jnp.array([[0.5, -1.5], [2.0, -4.0], [1.0, 3.0]])
    s = jnp.array([[0.9, -0.8], [0.1, 0.7], [-0.2, 0.6]])
    # top half of |s|: 0.9, 0.8, 0.7 -> w 0.5, -1.5, -4.0; alpha = 6 / 3 = 2
    out = binarized_supermask(w, s, 0.5)
    assert out.tolist() == [[2.0, -2.0], [0.0, -2.0], [0.0, 0.0]]
    assert binarize(w, out != 0).tolist() == out.tolist()
    # score gradient: g * w * sign(s), here with g = x (the upstream gradient)
    g = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    grads = jax.grad(lambda s: jnp.sum(binarized_supermask(w, s, 0.5) * g))(s)
    assert np.allclose(grads, g * w * jnp.sign(s))


def test_biprop_effective_params_have_one_magnitude_per_layer():
    method = biprop(optax.sgd(0.1), sparsity=0.6)
    params = lenet_params(jax.random.PRNGKey(0))
    state = jax.jit(method.init)(params, jax.random.PRNGKey(1))
    effective = jax.jit(method.effective_params)(state)
    for name in params:
        kernel, mask = effective[name]["kernel"], state.masks[name]["kernel"]
        w = state.params[name]["kernel"]
        alpha = float(jnp.sum(jnp.abs(w) * mask) / jnp.sum(mask))
        # the selections in numpy (the same values; eager jax boolean indexing compiles
        # a program per layer shape)
        kernel, mask, w = np.asarray(kernel), np.asarray(mask), np.asarray(w)
        assert np.allclose(np.abs(kernel[mask]), alpha, rtol=1e-6)
        assert bool(np.all(kernel[~mask] == 0))
        assert np.array_equal(np.sign(kernel[mask]), np.sign(w[mask]))
        assert np.array_equal(effective[name]["bias"], params[name]["bias"])


def test_biprop_density_ramps_linearly_to_the_target():
    method = biprop(optax.sgd(0.1), sparsity=0.8, ramp_epochs=1, batches_per_epoch=10)
    params = {"w": jnp.ones((10, 100))}
    state = jax.jit(method.init)(params, jax.random.PRNGKey(0))
    zero = {"w": jnp.zeros((10, 100))}
    update = jax.jit(method.update)
    counts = []
    for _ in range(12):
        counts.append(int(state.masks["w"].sum()))
        state = update(state, zero)
    assert counts[0] == 1000
    assert counts[5] == num_kept(1 - 0.8 * 0.5, 1000)
    assert counts[10:] == [200, 200]
    assert counts == sorted(counts, reverse=True)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        biprop(optax.sgd(0.1), sparsity=0.8, ramp_epochs=1)


# --------------------------------------------------------------------------- weights too


def test_supermask_weights_trains_only_kept_weights_through_the_mask():
    method = supermask_weights(optax.sgd(0.1), sparsity=0.5)
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    state = method.init(mlp_params(jax.random.PRNGKey(0), scale=1.0), jax.random.PRNGKey(1))
    xs, ys = batches(1)
    new, _ = step(state, (xs[0], ys[0]))
    kernel, mask = state.params["Dense_0"]["kernel"], state.masks["Dense_0"]["kernel"]
    moved = new.params["Dense_0"]["kernel"] != kernel
    assert not bool(moved[~mask].any())  # pruned weights get no gradient
    assert bool(moved[mask].any())
    assert not np.array_equal(new.params["Dense_0"]["bias"], state.params["Dense_0"]["bias"])
    assert not np.array_equal(new.scores["Dense_0/kernel"], state.scores["Dense_0/kernel"])


# --------------------------------------------------------------------------- transforms


def test_init_and_step_under_vmap():
    method = edge_popup(optax.sgd(0.1, momentum=0.9), sparsity=0.5)
    train_step = make_train_step(method, stateless_loss(mlp_loss))
    params = mlp_params(jax.random.PRNGKey(0), scale=1.0)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    states = jax.vmap(method.init, in_axes=(None, 0))(params, keys)
    xs, ys = batches(1)
    states, _ = jax.jit(jax.vmap(train_step, in_axes=(0, None)))(states, (xs[0], ys[0]))
    assert states.masks["Dense_0"]["kernel"].shape == (3, 20, 16)
    assert [int(m.sum()) for m in states.masks["Dense_0"]["kernel"]] == [160] * 3


@pytest.mark.slow
def test_pmap_step_matches_the_full_batch_step():
    method = edge_popup(optax.sgd(0.1, momentum=0.9), sparsity=0.5)
    params = mlp_params(jax.random.PRNGKey(0), scale=1.0)
    xs, ys = batches(1)
    n = 2
    pstep = jax.pmap(make_train_step(method, stateless_loss(mlp_loss), axis_name="d"),
                     axis_name="d")
    state = method.init(params, jax.random.PRNGKey(1))
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), state)
    batch = (xs[0].reshape(n, 16, 20), ys[0].reshape(n, 16))
    replicated, _ = pstep(replicated, batch)
    single, _ = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))(state,
                                                                          (xs[0], ys[0]))
    # the mean of per-device gradients equals the full-batch gradient
    np.testing.assert_allclose(replicated.scores["Dense_0/kernel"][0],
                               single.scores["Dense_0/kernel"], rtol=1e-5, atol=1e-7)
    assert np.array_equal(replicated.masks["Dense_1"]["kernel"][0],
                          replicated.masks["Dense_1"]["kernel"][1])


# --------------------------------------------------------------------------- bad input


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="weight_init must be one of"):
        edge_popup(optax.sgd(0.1), sparsity=0.5, weight_init="xavier")
    with pytest.raises(ValueError, match="scope must be"):
        edge_popup(optax.sgd(0.1), sparsity=0.5, scope="net")
    with pytest.raises(ValueError, match="sparsity"):
        edge_popup(optax.sgd(0.1), sparsity=1.0)
    with pytest.raises(ValueError, match="distribution"):
        edge_popup(optax.sgd(0.1), sparsity=0.5, scope="global", distribution="erk")
    with pytest.raises(ValueError, match="selects no leaf"):
        edge_popup(optax.sgd(0.1), sparsity=0.5).init({"b": jnp.zeros(3)},
                                                       jax.random.PRNGKey(0))
    method = edge_popup(optax.sgd(0.1), sparsity=0.5, dense_layers="^head/")
    state = method.init(lenet_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    assert "head/kernel" not in state.scores and bool(state.masks["head"]["kernel"].all())
