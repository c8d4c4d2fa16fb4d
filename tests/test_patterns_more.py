"""Sparsity patterns in SynFlow, the scheduled magnitude pruners (gradual magnitude,
magnitude after ``prune_step``) and the lottery driver (issue 20): exact counts per group
at every step, parity with hand-worked references, clear errors."""

import argparse
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_mlp import batches, mlp_loss, mlp_params

from sparsejax import get_method, make_train_step, stateless_loss
from sparsejax.core.distributions import kept_counts, select_masks
from sparsejax.core.masks import default_prunable
from sparsejax.core.patterns import (
    as_pattern,
    nm_groups,
    pattern_counts,
    pattern_mask,
    pattern_topk,
    pattern_units,
)
from sparsejax.core.schedules import cubic_sparsity
from sparsejax.harness.lottery import (
    LotteryConfig,
    add_commands,
    config_hash,
    imp_masks,
    round_counts,
)
from sparsejax.harness.lottery import config_from_args as _config_from_args
from sparsejax.harness.lottery import same_counts_random_mask as _same_counts_random_mask
from sparsejax.harness.lottery.masks import nm_rounds
from sparsejax.harness.training.loop import TrainConfig, build_method
from sparsejax.methods.pruning import (
    exclude_pruned,
    gradual_magnitude,
    magnitude,
    synflow,
    synflow_masks,
    synflow_scores,
)
from sparsejax.methods.pruning_tables import _PatternTable, masks_for_densities

KERNELS = (("Dense_0", "kernel"), ("Dense_1", "kernel"))


def group_counts(mask, pattern="2:4"):
    return np.asarray(nm_groups(jnp.asarray(mask).astype(jnp.int32), pattern).sum(axis=1))


def unit_state(mask, pattern):
    """Per block / channel: 1 kept whole, 0 pruned whole; asserts nothing in between."""
    m = np.asarray(mask)
    if pattern.startswith("block"):
        b = int(pattern.split(":")[1])
        rows, cols = m.shape
        tiles = m.reshape(rows // b, b, cols // b, b)
        whole, none = tiles.all(axis=(1, 3)), ~tiles.any(axis=(1, 3))
    else:
        whole, none = m.all(axis=0), ~m.any(axis=0)
    assert np.all(whole | none), "a block or channel is partly kept"
    return whole


def apply(params, state, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


@pytest.fixture(scope="module")
def params():
    return mlp_params(jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------- patterns


def test_pattern_topk_and_counts_round_trip():
    s = jax.random.normal(jax.random.PRNGKey(3), (8, 12))
    for pattern, count in (("unstructured", 37), ("block:4", 2), ("channel", 5)):
        mask = pattern_topk(s, pattern, count)
        assert int(pattern_counts(mask, pattern)) == count
        assert int(mask.sum()) == count * (96 // pattern_units(pattern, s.shape))
    # by hand: channel sums 3, 5, 4 -> the last two; a tie (3, 3) goes to the first
    np.testing.assert_array_equal(
        pattern_topk(jnp.array([[1.0, 5.0, 0.0], [2.0, 0.0, 4.0]]), "channel", 2),
        [[False, True, True]] * 2)
    np.testing.assert_array_equal(
        pattern_topk(jnp.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0]]), "channel", 1),
        [[True, False, False]] * 2)
    # traced counts under jit, and the density form (pattern_mask) at num_kept
    jitted = jax.jit(lambda x, k: pattern_topk(x, "block:4", k))
    for k in (0, 3, 6):
        np.testing.assert_array_equal(jitted(s, jnp.int32(k)), pattern_topk(s, "block:4", k))
    np.testing.assert_array_equal(pattern_mask(s, "block:4", 0.5), pattern_topk(s, "block:4", 3))
    counts = jnp.array([0, 1, 2, 3, 4, 1, 2, 2, 3, 3, 0, 4, 1, 1, 2, 2, 3, 4, 0, 1, 2, 3, 4, 0])
    mask = pattern_topk(s, "2:4", counts)
    np.testing.assert_array_equal(pattern_counts(mask, "2:4"), counts)


# ---------------------------------------------------------------------------- SynFlow


def test_synflow_nm_steps_down_inside_groups_and_ends_at_exactly_n(params):
    table = _PatternTable.of(params, [0.5 ** (k / 10) for k in range(1, 11)],
                             as_pattern("2:4"), "global", default_prunable, None)
    assert [row[0] for row in table.distinct().counts] == [4, 3, 2]
    masks = synflow_masks(apply, params, {}, (20,), 0.5, iterations=10, pattern="2:4")
    for layer, leaf in KERNELS:
        assert np.all(group_counts(masks[layer][leaf]) == 2)
        assert bool(jnp.all(masks[layer]["bias"]))
    # two rounds (densities 0.71 -> 3 of 4, then 0.5 -> 2 of 4), worked by hand
    ones = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)
    expected = ones
    for count in (3, 2):
        scores = exclude_pruned(synflow_scores(apply, params, {}, (20,), expected), expected)
        expected = {layer: {"kernel": pattern_topk(scores[layer]["kernel"], "2:4", count),
                            "bias": ones[layer]["bias"]} for layer, _ in KERNELS}
    got = synflow_masks(apply, params, {}, (20,), None, iterations=2, pattern="2:4")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pattern", ["block:4", "channel"])
def test_synflow_blocks_and_channels_whole_and_exact(params, pattern):
    masks = synflow_masks(apply, params, {}, (20,), 0.25, "uniform", iterations=5,
                          pattern=pattern)
    counts = kept_counts(params, 0.25, "uniform").per_leaf
    for (layer, leaf), count in zip(KERNELS, [c for c in counts if c is not None],
                                    strict=True):
        shape = params[layer][leaf].shape
        units = pattern_units(pattern, shape)
        kept = unit_state(masks[layer][leaf], pattern)
        assert int(kept.sum()) == round(count / np.prod(shape) * units)
    # one round is select_masks of the SynFlow scores with the pattern
    one = synflow_masks(apply, params, {}, (20,), 0.25, "uniform", iterations=1,
                        pattern=pattern)
    scores = synflow_scores(apply, params, {}, (20,))
    reference = select_masks(scores, 0.25, "uniform", pattern=pattern)
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(reference),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_synflow_method_with_a_pattern_and_its_errors(params):
    method = synflow(optax.sgd(0.1), sparsity=0.5, iterations=4, apply_fn=apply,
                     input_shape=(20,), pattern="2:4")
    state = method.init(params, jax.random.PRNGKey(1))
    for layer, leaf in KERNELS:
        assert np.all(group_counts(state.masks[layer][leaf]) == 2)
    with pytest.raises(ValueError, match="synflow: pattern 2:4 fixes the density at 0.5"):
        synflow(optax.sgd(0.1), sparsity=0.8, apply_fn=apply, pattern="2:4")
    with pytest.raises(ValueError, match=r"synflow: .*distribution 'global' ranks single"):
        synflow_masks(apply, params, {}, (20,), 0.5, "global", pattern="block:4")
    with pytest.raises(ValueError, match=r"synflow: .*Dense_0/kernel: .*length 20.*by 8"):
        synflow_masks(apply, params, {}, (20,), 0.5, pattern="4:8")


# ---------------------------------------------------------------------------- scheduled


def run_steps(method, params, n):
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    state = jax.jit(method.init)(params, jax.random.PRNGKey(1))
    xs, ys = batches(n)
    history = []
    for i in range(n):
        state, _ = step(state, (xs[i], ys[i]))
        history.append(jax.tree_util.tree_map(np.asarray, (state.masks, state.params)))
    return history


def test_gradual_magnitude_nm_steps_n_down_at_the_scheduled_steps(params):
    method = gradual_magnitude(optax.sgd(0.1, momentum=0.9), sparsity=0.5, total_steps=8,
                               end_step=6, frequency=2, pattern="2:4")
    schedule = cubic_sparsity(0.5, 0, 6, frequency=2)
    history = run_steps(method, params, 8)
    expected, previous = 4, None
    for step, (masks, weights) in enumerate(history, start=1):
        if step in (2, 4, 6):
            expected = 2 if step == 6 else int(np.floor((1 - schedule(step)) * 4 + 0.5))
        for layer, leaf in KERNELS:
            assert np.all(group_counts(masks[layer][leaf]) == expected), step
            assert not np.any(weights[layer][leaf][~masks[layer][leaf]])
            if previous is not None:  # nothing pruned comes back
                assert not np.any(masks[layer][leaf] & ~previous[layer][leaf])
        previous = masks
    assert [int(group_counts(h[0]["Dense_0"]["kernel"])[0]) for h in history] == \
        [4, 3, 3, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("pattern", ["block:4", "channel"])
def test_gradual_magnitude_ramps_by_whole_blocks_and_channels(params, pattern):
    method = gradual_magnitude(optax.sgd(0.1), sparsity=0.75, total_steps=6, end_step=4,
                               frequency=2, pattern=pattern)
    schedule = cubic_sparsity(0.75, 0, 4, frequency=2)
    history = run_steps(method, params, 5)
    for step, (masks, _) in enumerate(history, start=1):
        density = 1.0 if step < 2 else 1 - (0.75 if step >= 4 else float(schedule(2)))
        for layer, leaf in KERNELS:
            units = pattern_units(pattern, params[layer][leaf].shape)
            kept = unit_state(masks[layer][leaf], pattern)
            assert int(kept.sum()) == int(np.floor(density * units + 0.5)), (step, layer)


def test_magnitude_after_prune_step_with_a_pattern(params):
    method = magnitude(optax.sgd(0.1), sparsity=0.5, prune_step=3, pattern="2:4")
    history = run_steps(method, params, 4)
    for step, (masks, _) in enumerate(history, start=1):
        for layer, leaf in KERNELS:
            assert np.all(group_counts(masks[layer][leaf]) == (4 if step < 3 else 2))
    # step 3 updates the dense weights, then keeps the 2 largest |w| of every group
    before = history[1][1]
    xs, ys = batches(4)
    grads = jax.grad(mlp_loss)(before, (xs[2], ys[2]))
    for layer, leaf in KERNELS:
        updated = before[layer][leaf] - 0.1 * grads[layer][leaf]
        mask = history[2][0][layer][leaf]
        np.testing.assert_array_equal(mask, pattern_topk(jnp.abs(updated), "2:4", 2))
        np.testing.assert_allclose(history[2][1][layer][leaf], np.where(mask, updated, 0),
                                   rtol=1e-6, atol=1e-7)


def test_build_method_passes_the_pattern_to_the_scheduled_pruners(params):
    config = TrainConfig(method="gradual_magnitude", sparsity=0.5,
                         method_options={"pattern": "2:4", "frequency": 1, "end_step": 2})
    method = build_method(config, optax.sgd(0.1), total_steps=4, batches_per_epoch=2)
    masks = run_steps(method, params, 2)[-1][0]
    for layer, leaf in KERNELS:
        assert np.all(group_counts(masks[layer][leaf]) == 2)
    config = TrainConfig(method="synflow", sparsity=0.5,
                         method_options={"pattern": "2:4", "iterations": 3,
                                         "input_shape": (20,)})
    method = build_method(config, optax.sgd(0.1), total_steps=4, batches_per_epoch=2,
                          apply_fn=apply)
    masks = method.init(params, jax.random.PRNGKey(0)).masks
    for layer, leaf in KERNELS:
        assert np.all(group_counts(masks[layer][leaf]) == 2)


def test_scheduled_pattern_errors(params):
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="gradual_magnitude: pattern 2:4 fixes the density"):
        gradual_magnitude(sgd, sparsity=0.8, total_steps=10, pattern="2:4")
    with pytest.raises(ValueError, match=r"magnitude: .*distribution 'global' ranks single"):
        get_method("magnitude", sgd, sparsity=0.5, prune_step=2, distribution="global",
                   pattern="channel").init(params, jax.random.PRNGKey(0))
    method = gradual_magnitude(sgd, sparsity=0.5, total_steps=10, pattern="4:8")
    with pytest.raises(ValueError, match=r"gradual_magnitude: .*Dense_0/kernel: .*by 8"):
        method.init(params, jax.random.PRNGKey(0))  # at init, before any training
    with pytest.raises(ValueError, match=r"density 0.4 would keep 2 of every 4, fewer"):
        masks_for_densities(params, [0.4, 0.75], pattern="3:4")


# ---------------------------------------------------------------------------- lottery


def fake_params(seed=0):
    key = jax.random.PRNGKey(seed)
    shapes = {"fc1": (20, 32), "fc2": (32, 8), "head": (8, 4)}
    return {name: {"kernel": jax.random.normal(jax.random.fold_in(key, i), shape),
                   "bias": jnp.ones(shape[1])} for i, (name, shape) in enumerate(shapes.items())}


def dense(params):
    return jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)


def test_lottery_nm_rounds_step_n_down_by_magnitude():
    config = LotteryConfig(epochs=1, rounds=2, pattern="2:4", output_fraction=None)
    masks = dense(fake_params())
    for r, n in ((1, 3), (2, 2)):
        params = fake_params(r)
        previous, masks = masks, imp_masks(config, params, masks, r)
        for layer in ("fc1", "fc2", "head"):
            m = masks[layer]["kernel"]
            assert np.all(group_counts(m) == n)
            assert bool(jnp.all(masks[layer]["bias"]))
            # within each group: the largest |w| among the survivors
            score = exclude_pruned({"w": jnp.abs(params[layer]["kernel"])},
                                   {"w": previous[layer]["kernel"]})["w"]
            np.testing.assert_array_equal(m, pattern_topk(score, "2:4", n))
    random = _same_counts_random_mask(masks, jax.random.PRNGKey(7), default_prunable, "2:4")
    for layer in ("fc1", "fc2", "head"):
        assert np.all(group_counts(random[layer]["kernel"]) == 2)
        assert np.any(np.asarray(random[layer]["kernel"]) != np.asarray(masks[layer]["kernel"]))


@pytest.mark.parametrize("pattern", ["block:4", "channel"])
def test_lottery_blocks_and_channels_with_an_output_rate(pattern):
    config = LotteryConfig(epochs=1, pattern=pattern, prune_fraction=0.5, output_fraction=0.25)
    params = fake_params()
    masks = imp_masks(config, params, dense(params), 2)
    for layer in ("fc1", "fc2", "head"):
        units = pattern_units(pattern, params[layer]["kernel"].shape)
        rate = 0.25 if layer == "head" else 0.5
        kept = unit_state(masks[layer]["kernel"], pattern)
        assert int(kept.sum()) == round_counts(units, rate, 2)
    random = _same_counts_random_mask(masks, jax.random.PRNGKey(3), default_prunable, pattern)
    for layer in ("fc1", "fc2", "head"):
        assert int(unit_state(random[layer]["kernel"], pattern).sum()) == \
            int(unit_state(masks[layer]["kernel"], pattern).sum())


def test_lottery_pattern_hash_and_cli():
    base = LotteryConfig(epochs=2)
    assert config_hash(base) == config_hash(LotteryConfig(epochs=2, pattern="unstructured"))
    # the hash of an unstructured run is the one it had before the field existed
    assert config_hash(base) == "lenet300_mnist1d_" + hashlib.sha256(
        json.dumps({"epochs": 2}, sort_keys=True).encode()).hexdigest()[:10]
    assert config_hash(base) != config_hash(LotteryConfig(epochs=2, pattern="2:4", rounds=2))
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lottery", "--steps", "5", "--pattern", " 2:4", "--rounds", "1",
                              "--prune-fraction", "0.5", "--output-fraction", "same"])
    assert _config_from_args(args).pattern == "2:4"


def test_lottery_pattern_errors():
    assert nm_rounds(as_pattern("1:4"), 0.5) == 2
    with pytest.raises(ValueError, match=r"keeps 8, 4, 2 of every group of 8.*never keeps "
                                         r"exactly N=3"):
        LotteryConfig(epochs=1, pattern="3:8", prune_fraction=0.5, output_fraction=None,
                      rounds=1).check()
    with pytest.raises(ValueError, match=r"reached at round 2 .*rounds 18 would prune past "
                                         r"it: give rounds = 2"):
        LotteryConfig(epochs=1, pattern="2:4", output_fraction=None).check()  # rounds 18
    # too few rounds would end the run at another N: 4:4 -> 3:4 after one round
    with pytest.raises(ValueError, match=r"2:4 is reached at round 2 .*\(4, 3, 2 per group of "
                                         r"4\); rounds 1 would end at 3:4, not 2:4: give "
                                         r"rounds = 2"):
        LotteryConfig(epochs=1, pattern="2:4", prune_fraction=0.2, output_fraction=None,
                      rounds=1).check()
    with pytest.raises(ValueError, match=r"rounds 0 would end at 4:4, not 2:4"):
        LotteryConfig(epochs=1, pattern="2:4", output_fraction=None, rounds=0).check()
    LotteryConfig(epochs=1, pattern="2:4", output_fraction=None, rounds=2).check()
    with pytest.raises(ValueError, match=r"output_fraction must be 'same' \(None\) or 0"):
        LotteryConfig(epochs=1, pattern="2:4", rounds=2).check()  # output_fraction 0.1
    with pytest.raises(ValueError, match=r"needs distribution 'uniform'"):
        LotteryConfig(epochs=1, pattern="channel", distribution="global").check()
    with pytest.raises(ValueError, match=r"lottery pattern: unknown pattern 'blocks'"):
        LotteryConfig(epochs=1, pattern="blocks").check()
    config = LotteryConfig(epochs=1, pattern="2:4", rounds=1, prune_fraction=0.5,
                           output_fraction=None)
    bad = {"fc": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(ValueError, match=r"fc/kernel: .*length 6.*not divisible by 4"):
        imp_masks(config, bad, dense(bad), 1)


@pytest.mark.slow
def test_lottery_run_with_nm_keeps_the_pattern_in_ticket_and_controls(tmp_path):
    from sparsejax.harness.lottery import Trainer, run_lottery
    from sparsejax.io.checkpoint import Checkpointer

    config = LotteryConfig(dataset="mnist1d", model="lenet300", batch_size=64, steps=8,
                           rounds=1, pattern="2:4", prune_fraction=0.5, output_fraction=None,
                           controls=("reinit", "random_mask"), out_root=str(tmp_path))
    trainer = Trainer(config)
    summary = run_lottery(config, verbose=False, trainer=trainer)
    assert summary["rounds"][1]["density"] == pytest.approx(0.5, abs=1e-3)
    folder = tmp_path / config_hash(config) / "round_01"
    kept = {}
    for branch in ("ticket", "reinit", "random_mask"):
        with Checkpointer(folder / branch / "checkpoints") as c:
            _, state, _ = c.restore(trainer.initial_state())
        kept[branch] = state.masks
        flat = jax.tree_util.tree_flatten_with_path(state.masks)[0]
        kernels = [(jax.tree_util.keystr(p), m) for p, m in flat if np.ndim(m) == 2]
        assert len(kernels) == 3
        for path, mask in kernels:
            assert np.all(group_counts(mask) == 2), (branch, path)
    np.testing.assert_array_equal(jax.tree_util.tree_leaves(kept["ticket"])[1],
                                  jax.tree_util.tree_leaves(kept["reinit"])[1])
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(kept["ticket"]), jax.tree_util.tree_leaves(
            kept["random_mask"]), strict=True))


# ---------------------------------------------------------------------------- DST units


@pytest.mark.parametrize("name,pattern", [("rigl", "block:4"), ("set", "channel")])
def test_dst_moves_whole_blocks_and_channels_keeping_each_leafs_count(params, name, pattern):
    options = {"rigl": dict(update_every=2, end_step=16, total_steps=20),
               "set": dict(update_every=2, total_steps=20),
               "snfs": dict(update_every=2, total_steps=20)}[name]
    method = get_method(name, optax.sgd(0.1, momentum=0.9), sparsity=0.5,
                        distribution="uniform", pattern=pattern, **options)
    start = jax.jit(method.init)(params, jax.random.PRNGKey(1)).masks
    counts = {layer: int(unit_state(start[layer][leaf], pattern).sum())
              for layer, leaf in KERNELS}
    for layer, leaf in KERNELS:
        units = pattern_units(pattern, params[layer][leaf].shape)
        assert counts[layer] == units // 2
    history = run_steps(method, params, 6)
    for masks, weights in history:
        for layer, leaf in KERNELS:
            assert int(unit_state(masks[layer][leaf], pattern).sum()) == counts[layer]
            assert not np.any(weights[layer][leaf][~masks[layer][leaf]])
    final = history[-1][0]
    assert any(np.any(final[layer][leaf] != np.asarray(start[layer][leaf]))
               for layer, leaf in KERNELS), "no block or channel moved"


def test_block_regrowth_drops_the_weakest_block_and_grows_the_strongest():
    from sparsejax.methods.dst import (
        RegrowRules,
        Signals,
        gradient_grow,
        magnitude_drop,
        regrow_masks,
        round_fraction,
        same_leaf,
    )
    # a 4x4 kernel in 2x2 blocks: blocks (0,0) and (1,1) active, |w| sums 4.0 and 0.4
    params = jnp.zeros((4, 4)).at[:2, :2].set(1.0).at[2:, 2:].set(0.1)
    masks = jnp.zeros((4, 4), bool).at[:2, :2].set(True).at[2:, 2:].set(True)
    grads = jnp.zeros((4, 4)).at[:2, 2:].set(0.2).at[2:, :2].set(0.3)
    signals = Signals([params], [masks], [grads], None, jax.random.PRNGKey(0))
    rules = RegrowRules(magnitude_drop, gradient_grow, round_fraction, same_leaf)
    new, n_drop, n_grow = regrow_masks(rules, signals, jnp.float32(0.5), "block:2")
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = expected[2:, :2] = True  # (1,1) goes, (1,0) with the larger grads grows
    np.testing.assert_array_equal(new[0], expected)
    assert int(n_drop[0]) == int(n_grow[0]) == 1
