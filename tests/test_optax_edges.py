"""The edges of ``sparse_tx`` that used to fail, some silently (issue #28): optax's extra
arguments, schedules inside the wrapped optimizer on mask-update steps, transformations
after it that move pruned weights off zero, and score methods given to it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_mlp import batches, mlp_loss, mlp_params

import sparsejax
from sparsejax.integrations.zero_check import EVERY


def _train(tx, n, *, value=True, params=None):
    params = mlp_params(jax.random.PRNGKey(0)) if params is None else params
    opt_state = tx.init(params)
    params = sparsejax.zero_pruned(params, opt_state)
    xs, ys = batches(n)

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
        # A loss that never improves: reduce_on_plateau, if it sees it, lowers its scale.
        extra = {"value": jnp.ones_like(loss)} if value else {}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, opt_state), _ = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(
        (params, opt_state), (xs, ys))
    return params, opt_state


def _plateau_scale(opt_state):
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "scale")
    assert len(found) == 1
    return float(found[0][1])


# ------------------------------------------------------------------- optax's extra args

def test_extra_args_reach_reduce_on_plateau_inside_sparse_tx():
    inner = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau(
        factor=0.5, patience=1, cooldown=0, accumulation_size=1))
    tx = sparsejax.sparse_tx("rigl", inner, sparsity=0.75, update_every=4, end_step=20)
    params, opt_state = _train(tx, 20)
    assert _plateau_scale(opt_state) < 1.0  # it saw the losses and reduced the scale
    masks = sparsejax.masks_of(opt_state)
    for p, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks),
                    strict=True):
        assert not np.any(np.asarray(p)[~np.asarray(m)])
    # Without the value optax's own error says what is missing.
    with pytest.raises(TypeError, match="value"):
        _train(tx, 2, value=False)


@pytest.mark.parametrize("name", ["dense", "static", "gradual_magnitude", "set", "snfs"])
def test_extra_args_reach_the_wrapped_optimizer_of_every_method(name):
    options = {"dense": {}, "static": {"sparsity": 0.5},
               "gradual_magnitude": {"sparsity": 0.5, "total_steps": 8, "frequency": 2},
               "set": {"sparsity": 0.5, "update_every": 2},
               "snfs": {"sparsity": 0.5, "update_every": 2, "total_steps": 8}}[name]
    inner = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(
        factor=0.5, patience=0, cooldown=0, accumulation_size=1))
    tx = sparsejax.sparse_tx(name, inner, **options)
    opt_state = tx.init(mlp_params(jax.random.PRNGKey(0)))
    params = sparsejax.zero_pruned(mlp_params(jax.random.PRNGKey(0)), opt_state)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for loss in (1.0, 2.0, 3.0):  # worse every time (eagerly, no jit)
        updates, opt_state = tx.update(grads, opt_state, params, value=jnp.float32(loss))
        params = optax.apply_updates(params, updates)
    assert _plateau_scale(opt_state) < 1.0


def test_masks_is_not_an_extra_arg_to_hand_through():
    tx = sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.5)
    params = mlp_params(jax.random.PRNGKey(0))
    opt_state = tx.init(params)
    with pytest.raises(ValueError, match="replace_masks"):
        tx.update(params, opt_state, params, masks=sparsejax.masks_of(opt_state))


# ------------------------------------------- schedules follow the user's step (RigL skips)

STEPS = 1000


@pytest.mark.parametrize("name", ["rigl", "set", "snfs", "static", "gradual_magnitude"])
def test_a_schedule_inside_follows_the_users_step_on_every_step(name):
    schedule = optax.linear_schedule(1.0, 0.0, STEPS)
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9)
    options = {"rigl": {"update_every": 7, "end_step": STEPS},
               "set": {"update_every": 7}, "snfs": {"update_every": 7, "total_steps": STEPS},
               "static": {}, "gradual_magnitude": {"total_steps": STEPS, "frequency": 7}}[name]
    tx = sparsejax.sparse_tx(name, inner, sparsity=0.5, **options)
    params = {"w": jnp.ones((4, 4)) * 0.01}
    opt_state = tx.init(params)
    params = sparsejax.zero_pruned(params, opt_state)
    x = jax.random.normal(jax.random.PRNGKey(0), (STEPS, 4))

    def step(carry, x):
        params, opt_state = carry
        grads = jax.grad(lambda p: jnp.sum((x @ p["w"]) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        lr = optax.tree_utils.tree_get(opt_state, "learning_rate",
                                       filtering=lambda _, v: not isinstance(v, tuple))
        counts = [c for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
        return (optax.apply_updates(params, updates), opt_state), (lr, jnp.stack(counts))

    _, (lrs, counts) = jax.jit(lambda c, x: jax.lax.scan(step, c, x))((params, opt_state), x)
    # Every step counter counts the user's steps, also where RigL skipped the optimizer...
    np.testing.assert_array_equal(np.asarray(counts),
                                  np.repeat(np.arange(1, STEPS + 1)[:, None], 2, axis=1))
    # ...so each update the optimizer makes uses the plain optimizer's rate, schedule(t)
    # (inject_hyperparams records it; a step RigL skips leaves the record as it was).
    want = np.asarray(jax.vmap(schedule)(jnp.arange(STEPS)))
    ran = np.ones(STEPS, bool)
    if name == "rigl":
        ran[6::7] = False  # the updates that bring the counter to 7, 14, ...: masks only
    np.testing.assert_allclose(np.asarray(lrs)[ran], want[ran], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lrs)[~ran], want[np.flatnonzero(~ran) - 1],
                               rtol=0, atol=1e-6)


def test_rigl_skips_the_optimizer_on_mask_updates_but_counts_the_step():
    # RigL's reference semantics stay: the weights do not move on a mask-update step.
    tx = sparsejax.sparse_tx("rigl", optax.sgd(optax.linear_schedule(0.1, 0.0, 40)),
                             sparsity=0.75, update_every=4, end_step=40)
    params = mlp_params(jax.random.PRNGKey(0))
    opt_state = tx.init(params)
    params = sparsejax.zero_pruned(params, opt_state)
    xs, ys = batches(4)
    grad = jax.jit(jax.grad(mlp_loss))  # one program (eagerly: a program per op)
    for i in range(4):
        grads = grad(params, (xs[i], ys[i]))
        updates, opt_state = tx.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        masks = sparsejax.masks_of(opt_state)
        if i == 3:  # the 4th update moves the masks: survivors keep their values
            kept = jax.tree_util.tree_map(lambda old, m: jnp.where(m, old, 0.0), params, masks)
            for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(kept),
                            strict=True):
                np.testing.assert_array_equal(a, b)
        params = new
    counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
    assert counts == [4]


# --------------------------------------------------- after sparse_tx: warned, then refused

def test_a_transform_after_sparse_tx_is_warned_then_refused_by_masks_of():
    tx = optax.chain(sparsejax.sparse_tx("rigl", optax.sgd(0.1, momentum=0.9), sparsity=0.75,
                                         update_every=4, end_step=20), optax.scale(0.5))
    params = mlp_params(jax.random.PRNGKey(0))
    opt_state = tx.init(params)
    with pytest.warns(UserWarning, match=r"1 transformation\(s\) after sparse_tx .*EmptyState"):
        params = sparsejax.zero_pruned(params, opt_state)
    xs, ys = batches(8)
    step = jax.jit(lambda p, s, x, y: tx.update(jax.grad(mlp_loss)(p, (x, y)), s, p))
    for i in range(8):
        updates, opt_state = step(params, opt_state, xs[i], ys[i])
        params = optax.apply_updates(params, updates)
    # The 4th update dropped weights; halved on their way out, they were still there for
    # the 5th (step 4), which recorded it.
    check = opt_state[0].zero_check
    assert int(check.escaped_at) == 4 and int(check.escaped) > 0
    masks = sparsejax.integrations.optax_form._masks(opt_state)
    escaped = sum(int(np.sum((np.asarray(p) != 0) & ~np.asarray(m))) for p, m in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks), strict=True))
    assert escaped > 0  # what the check guards against: the params left the masks
    with pytest.raises(ValueError, match=r"non-zero in the params given to update 4.*inside"):
        sparsejax.masks_of(opt_state)


def test_the_check_has_no_false_alarm_for_static_masks_or_replaced_masks():
    # static after a scale: no weight is ever newly pruned, nothing escapes.
    tx = optax.chain(sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.75),
                     optax.scale(0.5))
    with pytest.warns(UserWarning, match="after sparse_tx"):
        _, opt_state = _train(tx, 6, value=False)
    sparsejax.masks_of(opt_state)
    # replace_masks: the next update zeroes the newly pruned weights; no alarm after it.
    tx = sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.75)
    params = mlp_params(jax.random.PRNGKey(0))
    opt_state = tx.init(params)
    params = sparsejax.zero_pruned(params, opt_state)
    flipped = jax.tree_util.tree_map(jnp.logical_not, sparsejax.masks_of(opt_state))
    flipped = jax.tree_util.tree_map(lambda m, p: m if p.ndim == 2 else jnp.ones_like(m),
                                     flipped, params)
    opt_state = sparsejax.replace_masks(opt_state, flipped)
    xs, ys = batches(EVERY)
    for i in range(EVERY):
        updates, opt_state = tx.update(jax.grad(mlp_loss)(params, (xs[i], ys[i])), opt_state,
                                       params)
        params = optax.apply_updates(params, updates)
    assert int(opt_state.zero_check.escaped_at) == -1
    sparsejax.masks_of(opt_state)
    # Params changed by hand outside the optimizer are caught when an update checks (the
    # one after a mask move, and every EVERY-th).
    params = jax.tree_util.tree_map(lambda p: p + 1.0, params)
    updates, opt_state = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), opt_state,
                                   params)
    with pytest.raises(ValueError, match="outside the optimizer"):
        sparsejax.masks_of(opt_state)


# ----------------------------------------------------------------- score methods, refused

@pytest.mark.parametrize("name", ["edge_popup", "biprop", "supermask_weights", "gates"])
def test_a_score_method_is_refused_when_sparse_tx_is_built(name):
    options = {"sparsity": 0.5} if name != "gates" else {"sparsity": 0.5, "total_steps": 10}
    with pytest.raises(ValueError, match=r"trains scores .*sparsejax.nnx.sparsify"):
        sparsejax.sparse_tx(name, optax.sgd(0.1), **options)


def test_update_without_this_transformations_state_names_the_fix():
    tx = sparsejax.sparse_tx("rigl", optax.sgd(0.1), sparsity=0.5, update_every=2,
                             end_step=4)
    params = mlp_params(jax.random.PRNGKey(0))
    for state in (None, optax.sgd(0.1).init(params)):
        with pytest.raises(ValueError, match=r"call opt_state = tx.init\(params\)"):
            tx.update(params, state, params)


def _drift_from(start):
    """A transformation that adds 0.01 to every update from its ``start``-th update on."""
    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        add = jnp.where(count >= start, 0.01, 0.0)
        return jax.tree_util.tree_map(lambda u: u + add, updates), count + 1

    return optax.GradientTransformation(init, update)


def test_a_leak_on_ordinary_steps_is_caught_by_the_periodic_check():
    # Something after sparse_tx revives pruned weights from update 5 on while the masks
    # never move: the check every EVERY updates finds it.
    tx = optax.chain(sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.75),
                     _drift_from(5))
    with pytest.warns(UserWarning, match="after sparse_tx"):
        _, opt_state = _train(tx, EVERY + 1, value=False)
    assert int(opt_state[0].zero_check.escaped_at) == EVERY
    with pytest.raises(ValueError, match=f"given to update {EVERY}"):
        sparsejax.masks_of(opt_state)


def test_bad_masks_seeds_and_trees_are_clear_errors():
    tx = sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.5)
    params = mlp_params(jax.random.PRNGKey(0))
    opt_state = tx.init(params)
    masks = sparsejax.masks_of(opt_state)
    for bad in (0.5, float("nan"), 2.0):
        with pytest.raises(ValueError, match="mask"):
            sparsejax.replace_masks(opt_state, jax.tree_util.tree_map(
                lambda m, bad=bad: jnp.where(m, bad, 0.0), masks))
    ones = jax.tree_util.tree_map(lambda m: m.astype(jnp.int32), masks)  # 0/1 ints: fine
    replaced = sparsejax.masks_of(sparsejax.replace_masks(opt_state, ones))
    assert all(m.dtype == bool for m in jax.tree_util.tree_leaves(replaced))
    with pytest.raises(ValueError, match=r"seed must be an int or a PRNG key .*'abc'"):
        sparsejax.sparse_tx("static", optax.sgd(0.1), sparsity=0.5, seed="abc")
    with pytest.raises(ValueError, match=r"the masks of this optimizer state"):
        sparsejax.zero_pruned({"other": jnp.ones(3)}, opt_state)
