"""Dynamic sparse training: SET, RigL and SNFS (sparsejax.methods.dst)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_mlp import assert_trainer_phases_match_update, batches, mlp_loss, mlp_params

from sparsejax import get_method, make_train_step, num_kept, stateless_loss
from sparsejax.core.topk import topk_rows
from sparsejax.harness.training.loop import TrainConfig, build_method
from sparsejax.methods import dst
from sparsejax.methods.dst import (
    RegrowRules,
    Signals,
    allocate,
    gradient_grow,
    magnitude_drop,
    momentum_grow,
    momentum_redistribution,
    random_grow,
    regrow_masks,
    reset_slots,
    rigl,
    round_fraction,
    same_leaf,
    snfs,
    sparse_evolutionary,
)

KERNELS = (("Dense_0", "kernel"), ("Dense_1", "kernel"))


def sgd_wd():
    return optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))


def build(name, optimizer=None, **options):
    optimizer = sgd_wd() if optimizer is None else optimizer
    defaults = {"rigl": dict(update_every=3, total_steps=40, end_step=8),
                "set": dict(update_every=3, total_steps=40),
                "snfs": dict(update_every=3, total_steps=40)}[name]
    return get_method(name, optimizer, sparsity=0.8, **{**defaults, **options})


_COMPILED = {}


def compiled(name, **options):
    """The method with jitted init, train step and update, compiled once per module."""
    key = (name, tuple(sorted(options.items())))
    if key not in _COMPILED:
        method = build(name, **options)
        _COMPILED[key] = SimpleNamespace(
            method=method, init=jax.jit(method.init), update=jax.jit(method.update),
            step=jax.jit(make_train_step(method, stateless_loss(mlp_loss))))
    return _COMPILED[key]


def start(name, seed=1, **options):
    c = compiled(name, **options)
    return c, c.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(seed))


def run(method, state, n_steps, *, step=None):
    step = step or jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    xs, ys = batches(n_steps)
    states = []
    for i in range(n_steps):
        state, _ = step(state, (xs[i], ys[i]))
        states.append(state)
    return states


def leaf(tree, path):
    return tree[path[0]][path[1]]


def layer_counts(masks):
    return [int(leaf(masks, p).sum()) for p in KERNELS]


# ------------------------------------------------------------------ invariants


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_set_and_rigl_keep_every_layer_count_and_move_the_mask(name):
    c, state = start(name)
    before = layer_counts(state.masks)
    states = run(c.method, state, 10, step=c.step)
    moved = 0
    for prev, cur in zip([state, *states[:-1]], states, strict=True):
        assert layer_counts(cur.masks) == before
        moved += int(jnp.sum(leaf(prev.masks, KERNELS[0]) != leaf(cur.masks, KERNELS[0])))
        for path in (("Dense_0", "bias"), ("Dense_1", "bias")):
            assert bool(jnp.all(leaf(cur.masks, path)))  # dense leaves stay dense
    assert moved > 0  # updates at steps 3, 6 and 9 really moved weights


def test_snfs_keeps_the_total_count_while_layers_trade():
    c, state = start("snfs")
    before = layer_counts(state.masks)
    states = run(c.method, state, 9, step=c.step)
    for s in states:
        assert sum(layer_counts(s.masks)) == sum(before)
    assert any(layer_counts(s.masks) != before for s in states)  # redistribution happened


@pytest.mark.parametrize("name", ["set", "rigl", "snfs"])
def test_masks_binary_pruned_weights_zero_and_their_slots_never_accumulate(name):
    c, state = start(name)
    method = c.method
    for s in run(method, state, 8, step=c.step):
        for m, p in zip(jax.tree_util.tree_leaves(s.masks),
                        jax.tree_util.tree_leaves(s.params), strict=True):
            assert m.dtype == jnp.bool_
            assert bool(jnp.all(jnp.where(m, 0.0, p) == 0.0))
        trace = s.opt_state[1][1][0].trace  # chain(mask_gradients, chain(wd, sgd), keep)
        for m, t in zip(jax.tree_util.tree_leaves(s.masks),
                        jax.tree_util.tree_leaves(trace), strict=True):
            assert bool(jnp.all(jnp.where(m, 0.0, t) == 0.0))
        eff = method.effective_params(s)
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: bool(jnp.array_equal(a, b)), eff, s.params))


def test_no_regrowth_onto_active_weights():
    # Grow scores are largest exactly on the active weights: a rule that regrew onto
    # them would lose weights; the engine must grow only among the others.
    mask = jnp.array([True, True, True, False, False, False, False, False])
    params = jnp.where(mask, jnp.array([3.0, 1.0, 2.0, 0, 0, 0, 0, 0]), 0.0)
    grads = jnp.array([9.0, 9.0, 9.0, 0.1, 0.3, 0.2, 0.0, 0.0])
    signals = Signals([params], [mask], [grads], None, jax.random.PRNGKey(0))
    rules = RegrowRules(magnitude_drop, gradient_grow, round_fraction, same_leaf)
    regrow = jax.jit(lambda s, f: regrow_masks(rules, s, f))
    new, n_drop, n_grow = regrow(signals, jnp.float32(0.34))
    assert int(n_drop[0]) == int(n_grow[0]) == 1
    # 1.0 is dropped; among the non-kept weights it has the largest gradient (9.0), so it
    # regrows (keeping its value): the mask is unchanged and nothing landed on 3.0 or 2.0.
    np.testing.assert_array_equal(new[0], mask)
    new, _, _ = regrow(signals, jnp.float32(0.0))
    np.testing.assert_array_equal(new[0], mask)


def test_rigl_grows_the_largest_gradient_inactive_weights_hand_built():
    w = jnp.array([[0.9, 0.0, -0.05, 0.0], [0.0, 0.7, 0.0, -0.4]])
    mask = w != 0
    g = jnp.array([[5.0, 0.3, 9.0, -0.8], [0.6, 7.0, -0.7, 0.1]])
    method = rigl(optax.sgd(0.1), sparsity=0.5, distribution="uniform", update_every=1,
                  end_step=100, drop_fraction=0.5)
    state = jax.jit(method.init)({"w": w}, jax.random.PRNGKey(0))
    state = state.replace(params={"w": w}, masks={"w": mask})
    new = jax.jit(method.update)(state, {"w": g})
    # drop 2 of 4 active by |w|: -0.05 and -0.4; grow 2 with the largest |g| among the
    # other six positions: -0.05's slot (9.0) and -0.8 at (0, 3).
    expected = jnp.array([[True, False, True, True], [False, True, False, False]])
    np.testing.assert_array_equal(new.masks["w"], expected)
    # The regrown -0.05 keeps its value, the newly grown weight starts at zero, the
    # dropped -0.4 is zero, survivors are not moved (the optimizer step is skipped).
    np.testing.assert_array_equal(new.params["w"],
                                  jnp.array([[0.9, 0.0, -0.05, 0.0], [0.0, 0.7, 0.0, 0.0]]))


def test_rigl_without_skip_steps_the_optimizer_before_moving_the_mask():
    w = jnp.array([[0.9, 0.0, -0.05, 0.0], [0.0, 0.7, 0.0, -0.4]])
    g = jnp.array([[5.0, 0.3, 9.0, -0.8], [0.6, 7.0, -0.7, 0.1]])
    method = rigl(optax.sgd(0.1), sparsity=0.5, distribution="uniform", update_every=1,
                  end_step=100, drop_fraction=0.5, skip_optimizer_on_update=False)
    state = jax.jit(method.init)({"w": w}, jax.random.PRNGKey(0))
    state = state.replace(params={"w": w}, masks={"w": w != 0})
    new = jax.jit(method.update)(state, {"w": g})
    assert float(new.params["w"][0, 0]) == pytest.approx(0.9 - 0.1 * 5.0)
    assert float(new.params["w"][0, 3]) == 0.0  # grown after the step: starts at zero


def test_set_drops_the_smallest_magnitudes_and_grows_at_random():
    c, state = start("set")  # drop fraction 0.3, the update runs after step 3
    state = state.replace(step=jnp.int32(2))
    zero = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    new = c.update(state, zero)
    w, old, cur = (leaf(t, KERNELS[0]) for t in (state.params, state.masks, new.masks))
    n_active = int(old.sum())
    keep = n_active - num_kept(0.3, n_active)
    largest = jnp.abs(w) >= jnp.sort(jnp.abs(w[old]))[::-1][keep - 1]
    assert bool(jnp.all(cur[largest & old]))  # the largest 70% survived
    assert int((old & ~cur).sum()) > 0  # some of the rest were dropped
    grown = cur & ~old
    assert int(grown.sum()) > 0 and int(cur.sum()) == n_active
    assert bool(jnp.all(leaf(new.params, KERNELS[0])[grown] == 0.0))
    other = c.update(state.replace(rng=jax.random.PRNGKey(5)), zero)
    assert not bool(jnp.array_equal(leaf(other.masks, KERNELS[0]) & ~old, grown))


def test_snfs_grows_by_momentum_and_caps_a_full_layer():
    # Layer a holds all the momentum, so SNFS wants all the regrowth there, but a can
    # only take back what it dropped plus its one free slot: the surplus goes to b (grown
    # by b's momentum) and the total stays exact.
    a = jnp.ones((4, 4)).at[0, 0].set(0.0)
    b = jnp.zeros((4, 4)).at[:3, :].set(jnp.arange(1.0, 13.0).reshape(3, 4))
    masks = [a != 0, b != 0]
    mom_a = jnp.full((4, 4), 10.0)
    mom_b = jnp.zeros((4, 4)).at[3, 3].set(0.5).at[3, 1].set(0.4).at[3, 0].set(0.1)
    signals = Signals([a, b], masks, [mom_a, mom_b], [mom_a, mom_b], jax.random.PRNGKey(0))
    rules = RegrowRules(magnitude_drop, momentum_grow, dst.ceil_fraction,
                        momentum_redistribution)
    new, n_drop, n_grow = jax.jit(lambda s, f: regrow_masks(rules, s, f))(
        signals, jnp.float32(0.25))
    assert n_drop.tolist() == [4, 3]  # ceil(0.25 * 15), ceil(0.25 * 12)
    assert n_grow.tolist() == [5, 2]  # a is capped at 16 - 11
    assert bool(new[0].all())
    b_expected = masks[1].at[0, :3].set(False).at[3, 3].set(True).at[3, 1].set(True)
    np.testing.assert_array_equal(new[1], b_expected)


def test_allocate_is_exact_and_respects_capacity():
    rng = np.random.default_rng(0)
    jallocate = jax.jit(allocate)
    for _ in range(40):
        n = int(rng.integers(1, 6))
        cap = rng.integers(0, 50, n)
        total = int(rng.integers(0, cap.sum() + 1))
        weights = rng.random(n) * (rng.random(n) > 0.3)
        got = np.asarray(jallocate(jnp.int32(total), jnp.asarray(weights, jnp.float32),
                                  jnp.asarray(cap, jnp.int32)))
        assert got.sum() == total and np.all(got <= cap) and np.all(got >= 0)
    np.testing.assert_array_equal(
        allocate(jnp.int32(9), jnp.array([1.0, 0.0, 2.0]), jnp.array([100, 100, 100])),
        [3, 0, 6])


def test_counts_are_exact_for_leaves_beyond_float32_densities():
    # 2**24 + 3 entries: a float32 density cannot name an odd count this large, so the
    # engine passes counts to its search; the drop keeps exactly n_active - n_drop.
    # The one program runs over 16M entries twice: it is compiled at XLA's default
    # optimisation level (the run's level 0, conftest.py, made it run 3x slower; the
    # search's result does not depend on the level), and the check reads numpy arrays.
    size = 2**24 + 3
    scores = np.random.default_rng(0).random(size, dtype=np.float32)
    keep = jax.jit(lambda s, c: topk_rows([s[None]], [c[None]])[0][0]).lower(
        scores, jnp.int32(0)).compile({"xla_backend_optimization_level": 3})  # traced once
    for count in (size - 2, 12_345_677):  # 2**24 + 1 (odd), and one below 2**24
        mask = np.asarray(keep(scores, jnp.int32(count)))
        assert mask.dtype == np.bool_ and int(mask.sum()) == count
        assert scores[mask].min() >= scores[~mask].max()


# ------------------------------------------------------------------ optimizer slots


def test_grown_weights_get_zeroed_slots_through_inject_hyperparams():
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    method = rigl(opt, sparsity=0.8, update_every=5, end_step=30, distribution="uniform")
    state = jax.jit(method.init)(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    states = run(method, state, 5)
    before, after = states[3], states[4]  # the update happens on the fifth step

    def trace(s):
        return leaf(s.opt_state[1].inner_state[0].trace, KERNELS[0])

    old, new = leaf(before.masks, KERNELS[0]), leaf(after.masks, KERNELS[0])
    grown, dropped, stayed = new & ~old, old & ~new, old & new
    assert int(grown.sum()) > 0 and bool(jnp.any(trace(before)[stayed] != 0))
    assert bool(jnp.all(trace(after)[grown] == 0.0))
    assert bool(jnp.all(trace(after)[dropped] == 0.0))
    np.testing.assert_array_equal(trace(after)[stayed], trace(before)[stayed])
    assert bool(jnp.all(leaf(after.params, KERNELS[0])[grown] == 0.0))
    hp = after.opt_state[1].hyperparams
    assert float(hp["learning_rate"]) == pytest.approx(0.1)  # hyperparameters untouched
    assert float(hp["momentum"]) == pytest.approx(0.9)


def test_reset_slots_works_for_adam():
    opt = optax.adam(1e-2)
    params = {"w": jnp.ones(3)}
    state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)[1]
    state = reset_slots(opt, state, {"w": jnp.array([True, False, True])})
    np.testing.assert_array_equal(state[0].mu["w"] == 0, [False, True, False])
    np.testing.assert_array_equal(state[0].nu["w"] == 0, [False, True, False])
    assert int(state[0].count) == 1


# ------------------------------------------------------------------ jit, vmap, determinism


# The engine is shared; SET's and SNFS's rules under vmap run with the slow tests.
@pytest.mark.parametrize("name", [pytest.param("set", marks=pytest.mark.slow), "rigl",
                                  pytest.param("snfs", marks=pytest.mark.slow)])
def test_vmap_over_seeds_matches_single_jitted_runs(name):
    c = compiled(name)
    params = mlp_params(jax.random.PRNGKey(0))
    seeds = jnp.stack([jax.random.PRNGKey(s) for s in (1, 2, 3)])
    xs, ys = batches(4)
    vstep = jax.jit(jax.vmap(make_train_step(c.method, stateless_loss(mlp_loss)),
                             in_axes=(0, None)))
    batched = jax.jit(jax.vmap(c.method.init, in_axes=(None, 0)))(params, seeds)
    singles = [c.init(params, key) for key in seeds]
    for i in range(4):  # one mask update, after step 3
        batched, _ = vstep(batched, (xs[i], ys[i]))
        singles = [c.step(s, (xs[i], ys[i]))[0] for s in singles]
    for i, single in enumerate(singles):
        picked = jax.tree_util.tree_map(lambda x, i=i: x[i], batched)
        for a, b in zip(jax.tree_util.tree_leaves(single.masks),
                        jax.tree_util.tree_leaves(picked.masks), strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves((single.params, single.opt_state)),
                        jax.tree_util.tree_leaves((picked.params, picked.opt_state)),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = ~jnp.array_equal(singles[0].masks["Dense_0"]["kernel"],
                             c.init(params, seeds[0]).masks["Dense_0"]["kernel"])
    assert bool(moved)
    assert not bool(jnp.array_equal(batched.masks["Dense_0"]["kernel"][0],
                                    batched.masks["Dense_0"]["kernel"][1]))


def test_update_is_deterministic_given_the_state():
    c, state = start("set")
    state = state.replace(step=jnp.int32(2))
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    a, b = c.update(state, grads), c.update(state, grads)
    np.testing.assert_array_equal(leaf(a.masks, KERNELS[0]), leaf(b.masks, KERNELS[0]))


def test_snfs_momentum_averages_dense_gradients():
    c, state = start("snfs")
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    state = c.update(c.update(state, grads), grads)
    m = leaf(state.extra["grad_momentum"], KERNELS[0])
    np.testing.assert_allclose(m, 0.19, rtol=1e-6)  # inactive ones too: 0.9 * 0.1 + 0.1


def test_materialize_passes_dense_gradients():
    c, state = start("rigl")
    method = c.method
    xs, ys = batches(1)
    grads = jax.jit(jax.grad(lambda p: mlp_loss(method.materialize(state, p),
                                                 (xs[0], ys[0]))))(state.params)
    g, m = leaf(grads, KERNELS[0]), leaf(state.masks, KERNELS[0])
    assert bool(jnp.any(g[~m] != 0))


# ------------------------------------------------------------------ options and errors


def test_rigl_end_step_beyond_training_is_an_error():
    with pytest.raises(ValueError, match="beyond the end of training"):
        rigl(optax.sgd(0.1), sparsity=0.9, end_step=200, total_steps=100)
    with pytest.raises(ValueError, match="end_step or total_steps"):
        rigl(optax.sgd(0.1), sparsity=0.9)


def test_no_mask_update_after_end_step():
    c, state = start("rigl")  # updates every 3 steps, end_step 8
    states = run(c.method, state, 10, step=c.step)
    masks = [leaf(s.masks, KERNELS[0]) for s in states]
    assert not bool(jnp.array_equal(masks[1], masks[2]))  # update after step 3
    assert not bool(jnp.array_equal(masks[4], masks[5]))  # and after step 6
    for later in masks[6:]:  # steps 7..10: none after end_step (not at step 9)
        np.testing.assert_array_equal(later, masks[5])


def test_epoch_methods_need_an_interval_and_snfs_needs_the_length():
    with pytest.raises(ValueError, match="once per epoch"):
        sparse_evolutionary(optax.sgd(0.1), sparsity=0.9)
    with pytest.raises(ValueError, match="total_steps"):
        snfs(optax.sgd(0.1), sparsity=0.9, update_every=10)
    with pytest.raises(ValueError, match="sparsity"):
        rigl(optax.sgd(0.1), sparsity=1.0, total_steps=10)
    with pytest.raises(ValueError, match="update_every"):
        rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10, update_every=0)


def test_registered_and_built_from_cli_options():
    opt = optax.sgd(0.1)
    for name, distribution in (("set", "uniform"), ("rigl", "erk"), ("snfs", "uniform")):
        config = TrainConfig(method=name, sparsity=0.9, distribution=distribution,
                             method_options={"update_every": 7})
        method = build_method(config, opt, total_steps=100, batches_per_epoch=10)
        assert method.name == name
    with pytest.raises(ValueError, match="unknown option"):
        build_method(TrainConfig(method="rigl", sparsity=0.9,
                                 method_options={"prune_rate": 0.5}), opt, total_steps=100)


def test_random_grow_and_gradient_grow_shapes():
    signals = Signals([jnp.zeros((3, 2))], [jnp.zeros((3, 2), bool)], [jnp.ones((3, 2))], None,
                      jax.random.PRNGKey(0))
    assert random_grow(signals)[0].shape == (3, 2)
    assert gradient_grow(signals)[0].shape == (3, 2)
    with pytest.raises(ValueError, match="momentum"):
        momentum_grow(signals)


@pytest.mark.slow
def test_rigl_trains_through_the_harness(tmp_path):
    from sparsejax.harness.training.loop import train
    result = train(TrainConfig(method="rigl", dataset="mnist1d", sparsity=0.9, epochs=2,
                               batch_size=128, out=str(tmp_path), progress=False,
                               method_options={"update_every": 20}))
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert result["test_accuracy"] > 0.15  # MNIST-1D, 10 classes: well above chance
    assert (tmp_path / "result.json").exists()


@pytest.mark.parametrize("name, options", [
    ("set", {}), ("rigl", {}), ("rigl", {"skip_optimizer_on_update": False}), ("snfs", {})])
def test_trainer_phases_give_the_states_of_the_traced_update(name, options):
    # update_every=3 and RigL's end_step=8: moves after steps 3 and 6 (and 9, 12 for SET
    # and SNFS); the jump makes the trainer re-read the counter (step 5 -> 6, a move).
    assert_trainer_phases_match_update(build(name, **options), 12, jump_at=4)
