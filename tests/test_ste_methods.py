"""The straight-through methods (``ste_magnitude``, ``ste_random``, ``sr_ste``), worked by
hand on small weights, then in every form: the native engine's step, the optax form in a
linen ``TrainState`` and an ``nnx.Optimizer`` (the one ``forward_params`` line), and the
CLI."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState
from toy_mlp import batches, mlp_loss, mlp_params

import sparsejax
from sparsejax import make_train_step, stateless_loss
from sparsejax.core.patterns import NM, pattern_counts
from sparsejax.methods.ste import SR_STE_DECAY

KERNELS = ("Dense_0", "Dense_1")


def _kernels(tree):
    return [np.asarray(tree[layer]["kernel"]) for layer in KERNELS]


@functools.cache
def _step(method_key):
    method = _METHODS[method_key]()
    return method, jax.jit(make_train_step(method, stateless_loss(mlp_loss)))


_METHODS = {
    "ste_90": lambda: sparsejax.ste_magnitude(optax.sgd(0.1, momentum=0.9), sparsity=0.9),
    "sr_ste_24": lambda: sparsejax.sr_ste(optax.sgd(0.1, momentum=0.9), sparsity=0.5,
                                          pattern="2:4"),
    "ste_48": lambda: sparsejax.ste_magnitude(  # 4:8 fits the 16 inputs of Dense_1 only
        optax.sgd(0.1), sparsity=0.5, pattern="4:8",
        prunable=lambda path, leaf: path == "Dense_1/kernel"),
    "ste_global": lambda: sparsejax.ste_magnitude(optax.sgd(0.1), sparsity=0.8,
                                                  distribution="global"),
    "ste_random": lambda: sparsejax.ste_random(optax.sgd(0.1), sparsity=0.75),
    "ste_ramp": lambda: sparsejax.ste_magnitude(optax.sgd(0.1), sparsity=0.9, end_step=4,
                                                update_every=2),
}


def _run(method_key, n=4, seed=3):
    method, step = _step(method_key)
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(seed))
    xs, ys = batches(n)
    states = [state]
    for i in range(n):
        state, _ = step(state, (xs[i], ys[i]))
        states.append(state)
    return method, states


def test_the_straight_through_gradient_reaches_the_pruned_weights():
    # loss = sum(c * (w * m)): the gradient of every weight, pruned or not, is c.
    w = jnp.array([[3.0, -1.0], [0.5, 2.0]])
    c = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    method = sparsejax.ste_magnitude(optax.sgd(0.5), sparsity=0.5)
    state = method.init({"w": w}, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(state.masks["w"], [[True, False], [False, True]])
    forward = method.materialize(state, state.params)
    np.testing.assert_array_equal(forward["w"], [[3.0, 0.0], [0.0, 2.0]])
    grads = jax.grad(lambda p: jnp.sum(c * method.materialize(state, p)["w"]))(state.params)
    np.testing.assert_array_equal(grads["w"], c)
    new = method.update(state, grads)
    np.testing.assert_allclose(new.params["w"], w - 0.5 * c)  # every weight moved
    # The new masks are the top-2 of |w - 0.5 c| = [[2.5, 2], [1, 0]].
    np.testing.assert_array_equal(new.masks["w"], [[True, True], [False, False]])
    np.testing.assert_array_equal(method.effective_params(new)["w"], [[2.5, -2.0], [0, 0]])


def test_sr_ste_adds_decay_times_the_pruned_weights_to_their_gradients():
    w = jnp.array([[4.0, 1.0], [-3.0, -2.0], [2.0, 3.0], [1.0, 4.0]])  # groups of 4 on rows
    g = jnp.array([[0.5, -0.5], [1.0, 1.0], [-1.0, 2.0], [0.0, 0.25]])
    method = sparsejax.sr_ste(optax.sgd(1.0), sparsity=0.5, pattern="2:4", decay=0.1)
    state = method.init({"w": w}, jax.random.PRNGKey(0))
    m = np.asarray(state.masks["w"])
    np.testing.assert_array_equal(m, [[True, False], [True, False], [False, True],
                                      [False, True]])
    new = method.update(state, {"w": g})
    expected = np.asarray(w) - (np.asarray(g) + 0.1 * (1 - m) * np.asarray(w))
    np.testing.assert_allclose(new.params["w"], expected, rtol=1e-6)
    assert sparsejax.sr_ste(optax.sgd(1.0), sparsity=0.5, pattern="2:4").name == "sr_ste"
    assert SR_STE_DECAY == 2e-4  # the reference code's default
    # decay=0 is plain STE, bit for bit
    plain = sparsejax.ste_magnitude(optax.sgd(1.0), sparsity=0.5, pattern="2:4")
    zero = sparsejax.sr_ste(optax.sgd(1.0), sparsity=0.5, pattern="2:4", decay=0.0)
    s1, s2 = plain.init({"w": w}, jax.random.PRNGKey(0)), zero.init({"w": w}, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(plain.update(s1, {"w": g}).params["w"],
                                  zero.update(s2, {"w": g}).params["w"])


def test_every_step_the_masks_are_the_top_k_of_the_current_weights_with_exact_counts():
    method, states = _run("ste_90")
    for state in states:
        for kernel, mask in zip(_kernels(state.params), _kernels(state.masks), strict=True):
            k = int(round(0.1 * kernel.size))
            assert mask.sum() == k
            want = sparsejax.topk_mask(jnp.abs(kernel), count=k)
            np.testing.assert_array_equal(mask, want)
        for layer in KERNELS:  # biases are not pruned
            assert bool(state.masks[layer]["bias"].all())
        effective = method.effective_params(state)
        assert sum(int((k != 0).sum()) for k in _kernels(effective)) == 32 + 6
    # The dense weights keep training: pruned entries change (those of units whose
    # outputs the masks cut get no gradient) and none is zeroed.
    first, last = _kernels(states[0].params)[0], _kernels(states[-1].params)[0]
    pruned = ~_kernels(states[0].masks)[0]
    assert np.mean(first[pruned] != last[pruned]) > 0.1
    assert np.count_nonzero(last) == last.size


@pytest.mark.parametrize("key,n,m", [("sr_ste_24", 2, 4), ("ste_48", 4, 8)])
def test_every_n_m_group_holds_exactly_n_every_step(key, n, m):
    _, states = _run(key)
    for state in states:
        masks = _kernels(state.masks)
        for mask in masks if m == 4 else masks[1:]:
            counts = np.asarray(pattern_counts(jnp.asarray(mask), NM(n, m)))
            assert np.all(counts == n)
        if m == 8:
            assert bool(masks[0].all())  # not prunable
    changed = any(np.any(a != b) for s0, s1 in zip(states, states[1:], strict=False)
                  for a, b in zip(_kernels(s0.masks), _kernels(s1.masks), strict=True))
    assert changed, "the masks never moved"


def test_global_distribution_ranks_every_layer_together():
    _, states = _run("ste_global")
    for state in states:
        kernels = _kernels(state.params)
        both = np.concatenate([np.abs(k).ravel() for k in kernels])
        want = np.asarray(sparsejax.topk_mask(jnp.asarray(both), count=round(0.2 * both.size)))
        got = np.concatenate([m.ravel() for m in _kernels(state.masks)])
        np.testing.assert_array_equal(got, want)


def test_random_ste_draws_a_new_mask_each_step_with_exact_counts():
    _, states = _run("ste_random")
    masks = [_kernels(s.masks)[0] for s in states]
    assert all(int(m.sum()) == 80 for m in masks)
    assert all(np.any(a != b) for a, b in zip(masks, masks[1:], strict=False))
    _, again = _run("ste_random")  # the same key: the same masks (resume, every device)
    np.testing.assert_array_equal(_kernels(again[-1].masks)[0], masks[-1])


def test_the_cubic_ramp_and_update_every():
    method, states = _run("ste_ramp", n=6)
    ramp = sparsejax.cubic_sparsity(0.9, 0, 4)
    kept = [int(_kernels(s.masks)[0].sum()) for s in states]
    # masks chosen at init and after steps 2, 4 (and 6); in between they stay
    assert kept[0] == 320 and kept[1] == 320
    assert kept[2] == kept[3] == round((1 - float(ramp(2))) * 320)
    assert kept[4] == kept[5] == kept[6] == 32
    assert method.phases is not None and method.phases.due(2) and not method.phases.due(3)
    np.testing.assert_array_equal(_kernels(states[2].masks)[0],
                                  sparsejax.topk_mask(jnp.abs(_kernels(states[2].params)[0]),
                                                      count=kept[2]))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="scores must be"):
        sparsejax.straight_through(optax.sgd(0.1), sparsity=0.5, scores="gradient")
    with pytest.raises(ValueError, match="decay must be"):
        sparsejax.sr_ste(optax.sgd(0.1), sparsity=0.5, decay=-1.0)
    with pytest.raises(ValueError, match="2:4"):
        sparsejax.sr_ste(optax.sgd(0.1), sparsity=0.9, pattern="2:4")
    with pytest.raises(ValueError, match="begin_step < end_step"):
        sparsejax.ste_magnitude(optax.sgd(0.1), sparsity=0.5, begin_step=5, end_step=5)
    method = sparsejax.sr_ste(optax.sgd(0.1), sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="sr_ste"):  # a kernel the pattern cannot split
        method.init({"w": jnp.ones((6, 3))}, jax.random.PRNGKey(0))


# ------------------------------------------------------------------ the optax form


def _apply(params, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


class _NnxMlp(nnx.Module):
    def __init__(self, params):
        rngs = nnx.Rngs(0)
        self.Dense_0 = nnx.Linear(20, 16, rngs=rngs)
        self.Dense_1 = nnx.Linear(16, 4, rngs=rngs)
        for layer in KERNELS:
            for leaf in ("kernel", "bias"):
                getattr(getattr(self, layer), leaf)[...] = params[layer][leaf]

    def __call__(self, x):
        return self.Dense_1(jax.nn.relu(self.Dense_0(x)))


@pytest.mark.parametrize("key", ["sr_ste_24", "ste_random"])
def test_optax_form_in_train_state_and_nnx_equals_native_engine(key):
    method, states = _run(key)
    ref = states[-1]
    tx = sparsejax.as_optax(method, seed=jax.random.PRNGKey(3))
    xs, ys = batches(4)

    @jax.jit
    def ts_step(ts, x, y):
        def loss_fn(params):
            logits = ts.apply_fn(sparsejax.forward_params(params, ts.opt_state), x)  # added
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ts.apply_gradients(grads=jax.grad(loss_fn)(ts.params))

    ts = TrainState.create(apply_fn=_apply, params=mlp_params(jax.random.PRNGKey(0)), tx=tx)
    for i in range(4):
        ts = ts_step(ts, xs[i], ys[i])
    _assert_same(sparsejax.masks_of(ts.opt_state), ts.params, ref)

    @nnx.jit
    def nnx_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = sparsejax.forward_params(model, optimizer.opt_state)(x)  # added
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        optimizer.update(model, nnx.grad(loss_fn)(model))

    model = _NnxMlp(mlp_params(jax.random.PRNGKey(0)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for i in range(4):
        nnx_step(model, optimizer, xs[i], ys[i])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _assert_same(sparsejax.masks_of(optimizer.opt_state), params, ref)


def _assert_same(masks, params, ref):
    for got, want in zip(jax.tree_util.tree_leaves(masks), jax.tree_util.tree_leaves(ref.masks),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref.params),
                         strict=True):  # dense: pruned weights keep their values
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_optax_form_keeps_dense_params_and_refuses_zero_pruned():
    tx = sparsejax.sparse_tx("ste_magnitude", optax.sgd(0.1), sparsity=0.5)
    params = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]])}
    opt_state = tx.init(params)
    with pytest.raises(ValueError, match="forward_params"):
        sparsejax.zero_pruned(params, opt_state)
    updates, opt_state = tx.update({"w": jnp.ones((2, 2))}, opt_state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], params["w"] - 0.1)  # pruned entries trained too
    np.testing.assert_array_equal(sparsejax.masks_of(opt_state)["w"],
                                  [[False, True], [True, False]])
    # forward_params is the params as they are for a method that zeroes pruned weights
    static = sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.5)
    assert sparsejax.forward_params(params, static.init(params)) is params


def test_export_packs_the_hard_masked_weights_with_exact_counts():
    method, states = _run("sr_ste_24")
    state = states[-1]
    packed = sparsejax.export_state(method, state, form="2:4")
    effective = method.effective_params(state)
    for layer in KERNELS:
        dense = np.asarray(sparsejax.nm_unpack(packed[layer]["kernel"]))
        np.testing.assert_array_equal(dense, effective[layer]["kernel"])
        assert np.count_nonzero(dense) == dense.size // 2
    bcoo = sparsejax.export_state(sparsejax.ste_magnitude(optax.sgd(0.1), sparsity=0.9),
                                  _run("ste_90")[1][-1])
    assert sum(int(bcoo[layer]["kernel"].nse) for layer in KERNELS) == 32 + 6


@pytest.mark.multidevice
@pytest.mark.parametrize("name,options,trainer", [
    ("sr_ste", {"sparsity": 0.5, "pattern": "2:4"}, "pmap"),
    ("ste_random", {"sparsity": 0.8, "distribution": "global"}, "sharded")])
def test_data_parallel_masks_are_identical_on_every_device_and_equal_one_device(
        name, options, trainer):
    from toy_mlp import fc_loss, fc_params

    from sparsejax.engine.parallel import (
        PmapTrainer,
        ShardedTrainer,
        SingleDeviceTrainer,
        make_mesh,
    )

    if jax.device_count() < 8:
        pytest.skip("needs 8 simulated devices")
    method = sparsejax.get_method(name, optax.sgd(0.1, momentum=0.9), **options)
    loss = stateless_loss(fc_loss)
    key = jax.random.PRNGKey(7)
    xs = np.asarray(jax.random.normal(key, (4, 32, 20)))
    ys = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (4, 32), 0, 4))

    def run(t):
        state = t.put_state(method.init(fc_params(20, 32, 4), jax.random.PRNGKey(1)))
        for i in range(4):
            state, _ = t.step(state, t.put_batch({"x": xs[i], "y": ys[i]}))
        return state

    one = run(SingleDeviceTrainer(method, loss))
    if trainer == "pmap":
        t = PmapTrainer(method, loss)
        state = run(t)
        for leaf in jax.tree_util.tree_leaves(state.masks):
            leaf = np.asarray(leaf)
            assert all(np.array_equal(leaf[0], leaf[i]) for i in range(1, leaf.shape[0]))
        state = t.get_state(state)
    else:
        state = run(ShardedTrainer(method, loss, make_mesh()))
        for leaf in jax.tree_util.tree_leaves(state.masks):
            shards = [np.asarray(s.data) for s in leaf.addressable_shards]
            assert all(np.array_equal(shards[0], s) for s in shards[1:])
    for a, b in zip(jax.tree_util.tree_leaves(state.masks), jax.tree_util.tree_leaves(one.masks),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(one.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_forward_params_inside_multi_transform_masks_only_the_sparse_group():
    params = {"w": jnp.array([[1.0, -3.0], [2.0, 0.5]]), "b": jnp.array([0.1, 0.2])}
    tx = optax.multi_transform(
        {"sparse": sparsejax.sparse_tx("ste_magnitude", optax.sgd(0.1), sparsity=0.5,
                                       prunable=lambda path, leaf: True),
         "dense": optax.sgd(0.1)}, {"w": "sparse", "b": "dense"})
    opt_state = tx.init(params)
    forward = sparsejax.forward_params(params, opt_state)
    np.testing.assert_array_equal(forward["w"], [[0.0, -3.0], [2.0, 0.0]])
    np.testing.assert_array_equal(forward["b"], params["b"])
