"""The optax form of every weight-training method (``sparsejax.sparse_tx``) in the user's
own loop: a linen ``TrainState``, an ``nnx.Optimizer``, ``optax.chain``,
``multi_transform``, ``masked``, ``inject_hyperparams`` and ``MultiSteps``. It is the
native engine seen from optax, so after N steps both give the same masks (exactly) and the
same params (to float rounding: ``p + (new - p)`` may round differently from ``new``)."""

import functools

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training.train_state import TrainState
from toy_mlp import batches, mlp_loss, mlp_params

import sparsejax
from sparsejax import InitContext, make_train_step, stateless_loss

N_STEPS = 4


def _apply(params, state, x):
    del state
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def _context():
    xs, ys = batches(1)
    loss = lambda p, s, b: (mlp_loss(p, b), (s, {}))  # noqa: E731
    return InitContext(loss, ((xs[0], ys[0]),))


# Every method that trains weights, on a schedule that moves masks within N_STEPS.
METHODS = {
    "dense": lambda opt: sparsejax.dense(opt),
    "static": lambda opt: sparsejax.static(opt, sparsity=0.8),
    "magnitude": lambda opt: sparsejax.magnitude(opt, sparsity=0.8),
    "magnitude_after_2": lambda opt: sparsejax.magnitude(opt, sparsity=0.8, prune_step=2),
    "gradual_magnitude": lambda opt: sparsejax.gradual_magnitude(
        opt, sparsity=0.8, total_steps=N_STEPS, end_step=3, frequency=1),
    "random_prune": lambda opt: sparsejax.random_prune(opt, sparsity=0.8),
    "snip": lambda opt: sparsejax.snip(opt, sparsity=0.8),
    "grasp": lambda opt: sparsejax.grasp(opt, sparsity=0.8),
    "synflow": lambda opt: sparsejax.synflow(opt, sparsity=0.8, iterations=3,
                                             apply_fn=_apply, input_shape=(20,)),
    "set": lambda opt: sparsejax.sparse_evolutionary(opt, sparsity=0.8, update_every=2),
    "rigl": lambda opt: sparsejax.rigl(opt, sparsity=0.8, update_every=2, end_step=N_STEPS),
    "snfs": lambda opt: sparsejax.snfs(opt, sparsity=0.8, update_every=2,
                                       total_steps=N_STEPS),
}


def _native(method, key, n=N_STEPS):
    state = method.init(mlp_params(jax.random.PRNGKey(0)), key, context=_context())
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    xs, ys = batches(n)
    for i in range(n):
        state, _ = step(state, (xs[i], ys[i]))
    return state


@jax.jit
def _train_state_step(ts, x, y):
    grads = jax.grad(mlp_loss)(ts.params, (x, y))
    return ts.apply_gradients(grads=grads)


def _assert_same(masks, params, ref):
    for got, want in zip(jax.tree_util.tree_leaves(masks), jax.tree_util.tree_leaves(ref.masks),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want, m in zip(jax.tree_util.tree_leaves(params),
                            jax.tree_util.tree_leaves(ref.params),
                            jax.tree_util.tree_leaves(ref.masks), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.any(np.asarray(got)[~np.asarray(m)]), "a pruned weight is not zero"


class _NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(20, 16, rngs=rngs)
        self.Dense_1 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.Dense_1(jax.nn.relu(self.Dense_0(x)))


def _nnx_model():
    model = _NnxMlp(nnx.Rngs(0))
    params = mlp_params(jax.random.PRNGKey(0))
    for layer in ("Dense_0", "Dense_1"):
        for leaf in ("kernel", "bias"):
            getattr(getattr(model, layer), leaf)[...] = params[layer][leaf]
    return model


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    def loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    optimizer.update(model, nnx.grad(loss)(model))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_optax_form_in_train_state_and_nnx_equals_native_engine(name):
    key = jax.random.PRNGKey(3)
    opt = optax.sgd(0.1, momentum=0.9)
    method = METHODS[name](opt)
    ref = _native(method, key)
    tx = sparsejax.as_optax(method, seed=key, context=_context())
    xs, ys = batches(N_STEPS)

    # A linen TrainState, unchanged but for tx= and the line that starts from the masks.
    ts = TrainState.create(apply_fn=_apply, params=mlp_params(jax.random.PRNGKey(0)), tx=tx)
    ts = ts.replace(params=sparsejax.zero_pruned(ts.params, ts.opt_state))
    for i in range(N_STEPS):
        ts = _train_state_step(ts, xs[i], ys[i])
    _assert_same(sparsejax.masks_of(ts.opt_state), ts.params, ref)
    assert int(ts.opt_state.step) == N_STEPS

    # Flax NNX: nnx.Optimizer(model, tx, wrt=nnx.Param).
    model = _nnx_model()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.update(model, sparsejax.zero_pruned(nnx.state(model, nnx.Param), optimizer.opt_state))
    for i in range(N_STEPS):
        _nnx_step(model, optimizer, xs[i], ys[i])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _assert_same(sparsejax.masks_of(optimizer.opt_state), params, ref)


def _rigl(opt):
    return sparsejax.rigl(opt, sparsity=0.8, update_every=2, end_step=8)


@functools.cache
def _rigl_reference(n=8):
    return _native(_rigl(optax.sgd(0.1, momentum=0.9)), jax.random.PRNGKey(0), n)


def _run_tx(tx, n, params=None):
    params = mlp_params(jax.random.PRNGKey(0)) if params is None else params
    opt_state = tx.init(params)
    params = sparsejax.zero_pruned(params, opt_state)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(mlp_loss)(params, (x, y))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    xs, ys = batches(n)
    for i in range(n):
        params, opt_state = step(params, opt_state, xs[i], ys[i])
    return params, opt_state


def test_rigl_inside_optax_chain_with_a_stateless_transform_first():
    tx = optax.chain(optax.identity(), sparsejax.sparse_tx(_rigl(optax.sgd(0.1, momentum=0.9))))
    params, opt_state = _run_tx(tx, 8)
    _assert_same(sparsejax.masks_of(opt_state), params, _rigl_reference())


def test_rigl_with_a_scheduled_learning_rate_through_inject_hyperparams():
    schedule = optax.linear_schedule(0.1, 0.01, 8)
    ref = _native(_rigl(optax.sgd(schedule, momentum=0.9)), jax.random.PRNGKey(0), 8)
    # The schedule inside the wrapped optimizer, injected (its slots reset on regrowth)...
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)
    params, opt_state = _run_tx(sparsejax.sparse_tx(_rigl(inner)), 8)
    _assert_same(sparsejax.masks_of(opt_state), params, ref)
    # ...and the whole sparse transformation rebuilt by inject_hyperparams each step. Its
    # schedule counts every update, RigL's mask-only steps too; so does the one inside
    # (the skipped optimizer steps still advance its counters), so both agree bitwise.
    outer = optax.inject_hyperparams(
        lambda learning_rate: sparsejax.sparse_tx(_rigl(optax.sgd(learning_rate, momentum=0.9)))
    )(learning_rate=schedule)
    params, opt_state = _run_tx(outer, 8)
    # inject_hyperparams records the learning rate of the last update, at count 7.
    assert float(opt_state.hyperparams["learning_rate"]) == pytest.approx(schedule(7))
    _assert_same(sparsejax.masks_of(opt_state), params, ref)


def test_rigl_under_multisteps_moves_masks_on_the_accumulated_gradients():
    k = 2
    tx = optax.MultiSteps(sparsejax.sparse_tx(_rigl(optax.sgd(0.1, momentum=0.9))),
                          every_k_schedule=k)
    params, opt_state = _run_tx(tx, 8 * k)
    # The native engine on the mean gradient of each pair of batches.
    method = _rigl(optax.sgd(0.1, momentum=0.9))
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(0))
    xs, ys = batches(8 * k)
    for i in range(8):
        grads = [jax.grad(mlp_loss)(state.params, (xs[k * i + j], ys[k * i + j]))
                 for j in range(k)]
        state = jax.jit(method.update)(state, jax.tree_util.tree_map(
            lambda *g: sum(g) / k, *grads))
    _assert_same(sparsejax.masks_of(opt_state), params, state)
    assert int(sparsejax.integrations.optax_form._find_states(opt_state)[0].step) == 8


def test_multi_transform_and_masked_train_only_their_group():
    labels = {"Dense_0": {"kernel": "sparse", "bias": "dense"},
              "Dense_1": {"kernel": "sparse", "bias": "dense"}}
    sparse = sparsejax.sparse_tx("rigl", optax.sgd(0.1, momentum=0.9), sparsity=0.8,
                                 update_every=2, end_step=8)
    tx = optax.multi_transform({"sparse": sparse, "dense": optax.adam(1e-2)}, labels)
    params, opt_state = _run_tx(tx, 8)
    masks = sparsejax.masks_of(opt_state)
    assert isinstance(masks["Dense_0"]["bias"], optax.MaskedNode)
    assert int(masks["Dense_0"]["kernel"].sum()) + int(masks["Dense_1"]["kernel"].sum()) == \
        int(_rigl_reference().masks["Dense_0"]["kernel"].sum()) + \
        int(_rigl_reference().masks["Dense_1"]["kernel"].sum())
    for layer in ("Dense_0", "Dense_1"):
        kept = np.asarray(masks[layer]["kernel"])
        assert not np.any(np.asarray(params[layer]["kernel"])[~kept])
        assert np.any(np.asarray(params[layer]["bias"]) != 0.0)  # adam trained the biases

    # optax.masked: the sparse transformation sees only the kernels.
    is_kernel = jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == "kernel", mlp_params(jax.random.PRNGKey(0)))
    tx = optax.chain(optax.masked(sparse, is_kernel),
                     optax.masked(optax.sgd(0.1), jax.tree_util.tree_map(
                         lambda b: not b, is_kernel)))
    params, opt_state = _run_tx(tx, 8)
    masks = sparsejax.masks_of(opt_state)
    assert not np.any(np.asarray(params["Dense_1"]["kernel"])[~np.asarray(
        masks["Dense_1"]["kernel"])])


@pytest.mark.parametrize("name", ["set", "rigl", "snfs"])
def test_regrowth_resets_slots_of_a_multi_transform_inside_the_method(name):
    labels = {"Dense_0": {"kernel": "a", "bias": "b"}, "Dense_1": {"kernel": "a", "bias": "b"}}
    inner = optax.multi_transform({"a": optax.sgd(0.1, momentum=0.9),
                                   "b": optax.sgd(0.1, momentum=0.9)}, labels)
    options = {"set": dict(update_every=2), "rigl": dict(update_every=2, end_step=8),
               "snfs": dict(update_every=2, total_steps=8)}[name]
    tx = sparsejax.sparse_tx(name, inner, sparsity=0.8, **options)
    _, opt_state = _run_tx(tx, 4)
    state = sparsejax.integrations.optax_form._find_states(opt_state)[0]
    trace = state.inner_state[1].inner_states["a"].inner_state[0].trace
    for layer in ("Dense_0", "Dense_1"):
        # Inactive weights have zero momentum: masked gradients between updates, and the
        # slots of weights dropped at an update reset with them.
        off = ~np.asarray(state.masks[layer]["kernel"])
        assert not np.any(np.asarray(trace[layer]["kernel"])[off])


def test_pruned_weights_leave_apply_updates_at_zero_even_without_zero_pruned():
    tx = sparsejax.sparse_tx("static", optax.adam(1e-2), sparsity=0.8)
    params = mlp_params(jax.random.PRNGKey(0))
    opt_state = tx.init(params)
    grads = jax.grad(mlp_loss)(params, tuple(b[0] for b in batches(1)))
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    masks = sparsejax.masks_of(opt_state)
    for p, m in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(masks),
                    strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
        assert np.all(np.asarray(p)[np.asarray(m)] != 0.0)


def test_masks_are_replaceable_and_saved_by_orbax_with_the_rest(tmp_path):
    tx = sparsejax.sparse_tx("static", optax.sgd(0.1, momentum=0.9), sparsity=0.8)
    ts = TrainState.create(apply_fn=_apply, params=mlp_params(jax.random.PRNGKey(0)), tx=tx)
    masks = jax.tree_util.tree_map(lambda m: ~m, sparsejax.masks_of(ts.opt_state))
    ts = ts.replace(opt_state=sparsejax.replace_masks(ts.opt_state, masks))
    ts = ts.replace(params=sparsejax.zero_pruned(ts.params, ts.opt_state))
    xs, ys = batches(2)
    ts = _train_state_step(ts, xs[0], ys[0])
    for p, m in zip(jax.tree_util.tree_leaves(ts.params), jax.tree_util.tree_leaves(masks),
                    strict=True):
        assert not np.any(np.asarray(p)[~np.asarray(m)])

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": ts.params, "opt_state": ts.opt_state})
    checkpointer.wait_until_finished()
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                    {"params": ts.params, "opt_state": ts.opt_state})
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert isinstance(restored["opt_state"], sparsejax.SparseTxState)
    for got, want in zip(jax.tree_util.tree_leaves(sparsejax.masks_of(restored["opt_state"])),
                         jax.tree_util.tree_leaves(masks), strict=True):
        np.testing.assert_array_equal(got, want)


def test_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="trains scores beside frozen weights"):
        sparsejax.sparse_tx("edge_popup", optax.sgd(0.1), sparsity=0.5).init(
            mlp_params(jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="needs the optimizer"):
        sparsejax.sparse_tx("rigl")
    with pytest.raises(ValueError, match="a built Method alone"):
        sparsejax.sparse_tx(sparsejax.static(optax.sgd(0.1), sparsity=0.5), optax.sgd(0.1))
    tx = sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.5)
    params = mlp_params(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="seed must be an int or a PRNG key"):
        sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.5, seed=0.5)
    assert sparsejax.masks_of(sparsejax.sparse_tx(  # a numpy int is a seed like an int
        "static", optax.sgd(0.1), sparsity=0.5, seed=np.int64(3)).init(params)) is not None
    with pytest.raises(ValueError, match="holds no sparse_tx state"):
        sparsejax.masks_of(optax.sgd(0.1).init(params))
