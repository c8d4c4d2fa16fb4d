"""The SNIP reference code's protocol (issue #22): biases in the global top-k, a fresh init
trained under the scored mask, the truncated variance-scaling init, the step lr schedule
and a held-out validation split."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax.harness.cli import build_parser, train_config
from sparsejax.harness.data import Dataset, load_dataset, split_validation
from sparsejax.harness.models import get_model, init_model
from sparsejax.harness.training.loop import TrainConfig, evaluate, make_eval_step, prepare, train
from sparsejax.harness.training.optim import make_optimizer, step_lr_schedule
from sparsejax.io.checkpoint import Checkpointer
from sparsejax.methods import InitContext
from sparsejax.methods.pruning import snip

# --------------------------------------------------------------------------- a tiny net

KEY = jax.random.PRNGKey(7)
# two Dense layers with biases: K = 3*4 + 4*2 = 20 kernel entries, B = 4 + 2 = 6 biases
TINY = {
    "a": {"kernel": jax.random.normal(jax.random.fold_in(KEY, 1), (3, 4)), "bias": jnp.zeros(4)},
    "b": {"kernel": jax.random.normal(jax.random.fold_in(KEY, 2), (4, 2)), "bias": jnp.zeros(2)},
}
BATCH = {"x": jax.random.normal(jax.random.fold_in(KEY, 3), (5, 3)),
         "y": jax.random.normal(jax.random.fold_in(KEY, 4), (5, 2))}


def tiny_loss(params, model_state, batch):
    hidden = jnp.tanh(batch["x"] @ params["a"]["kernel"] + params["a"]["bias"])
    pred = hidden @ params["b"]["kernel"] + params["b"]["bias"]
    return 0.5 * jnp.mean((pred - batch["y"]) ** 2), (model_state, {})


def kernel_kept(masks):
    return int(masks["a"]["kernel"].sum() + masks["b"]["kernel"].sum())


def test_prune_biases_masks_every_bias_and_counts_over_kernels_and_biases():
    context = InitContext(tiny_loss, (BATCH,))
    # By hand: sparsity 0.75 keeps num_kept(0.25, n) = floor(0.25 * n + 0.5) entries.
    # Over the kernels alone (n = 20): floor(5.5) = 5. Over kernels + biases (n = 26, the
    # reference code): floor(6.5 + 0.5) = 7, all of them kernels (the biases score 0).
    plain = snip(optax.sgd(0.1), sparsity=0.75).init(TINY, KEY, context=context)
    assert kernel_kept(plain.masks) == 5
    assert plain.masks["a"]["bias"].all() and plain.masks["b"]["bias"].all()

    state = snip(optax.sgd(0.1), sparsity=0.75, prune_biases=True).init(TINY, KEY,
                                                                        context=context)
    assert not state.masks["a"]["bias"].any() and not state.masks["b"]["bias"].any()
    assert kernel_kept(state.masks) == 7
    # the 7 kept kernels are the 7 largest |g * w| among the kernels
    grads = jax.grad(lambda p: tiny_loss(p, {}, BATCH)[0])(TINY)
    saliency = np.concatenate([np.abs(np.asarray(grads[n]["kernel"] * TINY[n]["kernel"])).ravel()
                               for n in ("a", "b")])
    chosen = np.concatenate([np.asarray(state.masks[n]["kernel"]).ravel() for n in ("a", "b")])
    assert saliency[chosen].min() > saliency[~chosen].max()


def test_prune_biases_bad_values():
    with pytest.raises(ValueError, match="distribution 'global'"):
        snip(optax.sgd(0.1), sparsity=0.5, prune_biases=True, distribution="uniform")
    with pytest.raises(TypeError, match="prune_biases must be true or false"):
        snip(optax.sgd(0.1), sparsity=0.5, prune_biases="yes")
    with pytest.raises(TypeError, match="fresh_init must be true or false"):
        snip(optax.sgd(0.1), sparsity=0.5, fresh_init=1)


def test_fresh_init_trains_an_independent_draw_under_the_scored_mask():
    drawn = []

    def init_params(key):
        drawn.append(key)
        return jax.tree_util.tree_map(
            lambda p: jax.random.normal(key, p.shape) if p.ndim == 2 else jnp.zeros_like(p),
            TINY)

    context = InitContext(tiny_loss, (BATCH,), init_params)
    scored = snip(optax.sgd(0.1), sparsity=0.5).init(TINY, KEY, context=context)
    fresh = snip(optax.sgd(0.1), sparsity=0.5, fresh_init=True).init(TINY, KEY, context=context)
    assert len(drawn) == 1
    for n in ("a", "b"):  # the mask is the one scored on TINY
        np.testing.assert_array_equal(fresh.masks[n]["kernel"], scored.masks[n]["kernel"])
        mask = np.asarray(fresh.masks[n]["kernel"])
        trained = np.asarray(fresh.params[n]["kernel"])
        # the trained weights are the new draw, zero where pruned
        draw = np.asarray(init_params(drawn[0])[n]["kernel"])
        np.testing.assert_array_equal(trained, np.where(mask, draw, 0))
        assert not np.isclose(trained[mask], np.asarray(TINY[n]["kernel"])[mask]).any()
    with pytest.raises(ValueError, match="init_params"):
        snip(optax.sgd(0.1), sparsity=0.5, fresh_init=True).init(
            TINY, KEY, context=InitContext(tiny_loss, (BATCH,)))


def test_harness_reference_snip_on_mnist1d():
    base = dict(method="snip", dataset="mnist1d", model="lenet300", sparsity=0.95, steps=1,
                batch_size=100, seed=1, progress=False)
    scored = prepare(TrainConfig(**base))
    run = prepare(TrainConfig(**base, method_options={"prune_biases": True, "fresh_init": True}))
    names = ("fc1", "fc2", "head")
    kernels = sum(run.state.params[n]["kernel"].size for n in names)
    biases = sum(run.state.params[n]["bias"].size for n in names)
    assert kernel_kept_of(run.state.masks, names) == int(np.floor(0.05 * (kernels + biases) + 0.5))
    for n in names:
        assert not np.asarray(run.state.masks[n]["bias"]).any()
        assert not np.asarray(run.state.params[n]["bias"]).any()
    # fresh_init alone: the same mask as the scored run, other weights
    fresh = prepare(TrainConfig(**base, method_options={"fresh_init": True}))
    for n in names:
        mask = np.asarray(scored.state.masks[n]["kernel"])
        np.testing.assert_array_equal(np.asarray(fresh.state.masks[n]["kernel"]), mask)
        a = np.asarray(fresh.state.params[n]["kernel"])[mask]
        b = np.asarray(scored.state.params[n]["kernel"])[mask]
        assert not np.isclose(a, b).any()


def kernel_kept_of(masks, names):
    return sum(int(np.asarray(masks[n]["kernel"]).sum()) for n in names)


# --------------------------------------------------------------------------- kernel init


def test_lecun_normal_kernel_init_is_truncated_fan_in_variance_scaling():
    model = get_model("lenet300", 10, kernel_init="lecun_normal")
    params, _ = init_model(model, jax.random.PRNGKey(0), (1, 784))
    for name, tolerance in (("fc1", 0.02), ("fc2", 0.03)):
        w = np.asarray(params[name]["kernel"], np.float64)
        fan_in = w.shape[0]
        std = np.sqrt(1.0 / fan_in)
        assert abs(w.std() / std - 1) < tolerance  # fan_in, not fan_avg (fc1: 21% more)
        # cut at 2 std of the underlying normal, whose std is raised so that the
        # truncated draw has std sqrt(1 / fan_in): 2 / 0.8796 = 2.27 of the target std
        assert np.abs(w).max() <= 2 * std / 0.87962566103423978 + 1e-7
        assert np.abs(w).max() > 2 * std  # and it does reach past 2 target std
    assert not np.asarray(params["fc1"]["bias"]).any()


def test_default_kernel_init_unchanged_and_bad_value():
    key = jax.random.PRNGKey(0)
    default, _ = init_model(get_model("lenet300", 10), key, (1, 784))
    named, _ = init_model(get_model("lenet300", 10, kernel_init="glorot_normal"), key, (1, 784))
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(named), strict=True):
        np.testing.assert_array_equal(a, b)
    w = np.asarray(default["fc1"]["kernel"])
    assert abs(w.std() / np.sqrt(2 / (784 + 300)) - 1) < 0.02  # Glorot normal
    with pytest.raises(ValueError, match="kernel_init"):
        get_model("lenet300", 10, kernel_init="he_uniform")
    with pytest.raises(ValueError, match="kernel_init"):
        get_model("mlp", 10, kernel_init=3)


# --------------------------------------------------------------------------- lr schedule


def test_step_lr_schedule_values():
    schedule = step_lr_schedule(0.1, 25_000)
    counts = [0, 1, 24_999, 25_000, 49_999, 50_000, 75_000, 100_000]
    expected = [0.1, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-4, 1e-5]
    np.testing.assert_allclose([float(schedule(c)) for c in counts], expected, rtol=1e-5)


def test_step_schedule_in_the_optimizer_updates():
    # plain SGD (no momentum) on a constant gradient 1: the update of step t is -lr_t, so
    # steps 1-2 move by 1, steps 3-4 by 0.1, step 5 by 0.01 (decay every 2 steps)
    opt = make_optimizer("sgd", 1.0, total_steps=5, momentum=0.0, lr_schedule="step",
                         lr_decay_every=2)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    moves = []
    for _ in range(5):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        moves.append(float(updates["w"]))
    np.testing.assert_allclose(moves, [-1, -1, -0.1, -0.1, -0.01], rtol=1e-6)


def test_step_schedule_bad_values():
    with pytest.raises(ValueError, match="lr_decay_every"):
        make_optimizer("sgd", 0.1, total_steps=10, lr_schedule="step")
    with pytest.raises(ValueError, match="needs lr_schedule 'step'"):
        make_optimizer("sgd", 0.1, total_steps=10, lr_schedule="cosine", lr_decay_every=5)
    with pytest.raises(ValueError, match="lr_decay_every"):
        step_lr_schedule(0.1, 2.5)
    with pytest.raises(ValueError, match="--lr-decay-every"):
        prepare(TrainConfig(steps=1, lr_schedule="step", lr_decay_every=-1))


# --------------------------------------------------------------------------- validation


def numbered(n_train, n_test=3):
    return Dataset("numbered", np.arange(n_train, dtype=np.float32)[:, None],
                   np.arange(n_train, dtype=np.int32) % 10,
                   np.arange(n_test, dtype=np.float32)[:, None] + 1000,
                   np.zeros(n_test, np.int32), num_classes=10)


def test_split_validation_sizes_disjoint_and_fixed():
    data = numbered(100)
    train_part, held = split_validation(data, 10)
    kept = train_part.train_images[:, 0].astype(int)
    out = held.test_images[:, 0].astype(int)
    assert len(kept) == 90 and len(out) == 10 and len(held.train_labels) == 0
    assert not set(kept) & set(out) and set(kept) | set(out) == set(range(100))
    assert (np.diff(kept) > 0).all() and (np.diff(out) > 0).all()  # original order kept
    np.testing.assert_array_equal(held.test_labels, out % 10)
    np.testing.assert_array_equal(train_part.test_images, data.test_images)  # test untouched
    # the choice comes from its own seed (VALIDATION_SEED), not from the caller's data order
    _, other = split_validation(data, 10, seed=1)
    assert not np.array_equal(other.test_images, held.test_images)
    assert not (out == np.arange(10)).all()  # a random choice, not the first ten
    for bad in (0, 100, -1, 2.5, True):
        with pytest.raises(ValueError, match="validation_size"):
            split_validation(data, bad)


def test_validation_split_in_the_harness(tmp_path):
    config = TrainConfig(dataset="mnist1d", steps=3, batch_size=100, validation_size=400,
                         eval_every=3, progress=False, tensorboard=False, out=str(tmp_path / "r"))
    run = prepare(config)
    full = load_dataset("mnist1d", seed=0)
    assert len(run.dataset.train_labels) == 3600 and len(run.validation.test_labels) == 400
    assert run.batches_per_epoch == 36
    assert len(run.dataset.test_labels) == len(full.test_labels)
    result = train(config)
    # the reported validation accuracy is the final weights' on the held-out examples
    _, state, _ = Checkpointer(tmp_path / "r" / "checkpoints").restore(run.state)
    held_out = evaluate(jax.jit(make_eval_step(run.model)),
                        (run.method.effective_params(state), state.model_state), run.validation)
    assert result["validation_accuracy"] == held_out["accuracy"]
    assert result["validation_accuracy"] != result["test_accuracy"]
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["validation_accuracy"] == result["validation_accuracy"]
    with pytest.raises(ValueError, match="validation_size"):
        prepare(TrainConfig(dataset="mnist1d", steps=1, validation_size=4000))
    with pytest.raises(ValueError, match="--validation-size"):
        prepare(TrainConfig(dataset="mnist1d", steps=1, validation_size=-5))


def test_cli_flags_reach_the_config():
    args = build_parser()[0].parse_args(
        ["train", "--lr-schedule", "step", "--lr-decay-every", "25000", "--validation-size",
         "6000", "--method-option", "prune_biases=true", "--model-option",
         "kernel_init=lecun_normal"])
    config = train_config(args)  # what sparsejax train runs
    assert (config.lr_schedule, config.lr_decay_every, config.validation_size) == (
        "step", 25000, 6000)
    assert config.method_options == {"prune_biases": True}
    assert config.model_options == {"kernel_init": "lecun_normal"}
    defaults = build_parser()[0].parse_args(["train"])
    assert (defaults.lr_decay_every, defaults.validation_size) == (0, 0)
    assert (TrainConfig().lr_decay_every, TrainConfig().validation_size) == (0, 0)


def test_the_step_schedule_is_checked_before_any_data_loads(tmp_path):
    # the data folder does not exist: the schedule's error must come first
    missing = str(tmp_path / "no_mnist")
    with pytest.raises(ValueError, match="needs lr_decay_every"):
        prepare(TrainConfig(dataset="mnist", data_dir=missing, steps=1, lr_schedule="step"))
    with pytest.raises(ValueError, match="needs lr_schedule 'step'"):
        prepare(TrainConfig(dataset="mnist", data_dir=missing, steps=1, lr_decay_every=5))
