"""Batch-norm statistics recomputed for the evaluated network (the gates on batch norm):
the formula against numpy on fixed inputs, the fixed choice of batches, and the harness
evaluating a gates run with them."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_mnist import small_mnist

from sparsejax.harness.training.batch_norm import (
    needs_recalibration,
    recalibrated_batch_stats,
    recalibration_images,
)


class DenseNorm(nn.Module):
    """A Dense layer into a batch norm of the zoo's momentum, and one more behind it."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(5)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.99)(jnp.tanh(x) * 3)


def test_statistics_are_the_mean_and_variance_over_every_example():
    model = DenseNorm()
    rng = np.random.default_rng(0)
    images = [rng.normal(2.0, 3.0, (8, 4)).astype(np.float32) for _ in range(3)]
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    got = recalibrated_batch_stats(model, params, state, images)["batch_stats"]

    everything = np.concatenate(images).astype(np.float64)
    dense = params["Dense_0"]
    first = everything @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"])
    np.testing.assert_allclose(got["BatchNorm_0"]["mean"], first.mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["BatchNorm_0"]["var"], first.var(0), rtol=1e-5)
    # the second batch norm sees the first normalised by each batch's own statistics
    normed = np.concatenate([
        (part - part.mean(0)) / np.sqrt(part.var(0) + 1e-5) for part in np.split(first, 3)])
    second = np.tanh(normed) * 3
    np.testing.assert_allclose(got["BatchNorm_1"]["mean"], second.mean(0), rtol=2e-4,
                               atol=1e-5)
    np.testing.assert_allclose(got["BatchNorm_1"]["var"], second.var(0), rtol=2e-4)


def test_bad_batches_are_refused():
    model = DenseNorm()
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    state = {"batch_stats": variables["batch_stats"]}
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrated_batch_stats(model, variables["params"], state, [])
    with pytest.raises(ValueError, match="batches of one size"):
        recalibrated_batch_stats(model, variables["params"], state,
                                 [np.ones((4, 4)), np.ones((3, 4))])


def test_the_batches_are_a_fixed_seeded_choice_without_repeats():
    images = np.arange(50)[:, None]
    chosen = recalibration_images(images, 4, 10, seed=3)
    assert [len(b) for b in chosen] == [10] * 4
    flat = np.concatenate(chosen).ravel()
    assert len(set(flat.tolist())) == 40
    np.testing.assert_array_equal(
        flat, np.concatenate(recalibration_images(images, 4, 10, 3)).ravel())
    assert len(recalibration_images(images, 9, 10, 3)) == 5  # no more than the data holds


def test_only_relaxed_methods_on_batch_norm_are_recalibrated():
    """The methods say whether their training forward pass is relaxed
    (``Method.relaxed_forward``): of every registered method, only the gates."""
    import optax

    import sparsejax
    from sparsejax.methods.registry import METHODS

    needs = {"dense": {}, "rigl": {"sparsity": 0.5, "total_steps": 100},
             "set": {"sparsity": 0.5, "batches_per_epoch": 10},
             "snfs": {"sparsity": 0.5, "total_steps": 100, "batches_per_epoch": 10},
             "gradual_magnitude": {"sparsity": 0.5, "total_steps": 100},
             "synflow": {"sparsity": 0.5, "apply_fn": lambda params, state, x: x}}
    relaxed = set()
    for name in sorted(METHODS):
        method = sparsejax.get_method(name, optax.sgd(0.1), **needs.get(name, {"sparsity": 0.5}))
        if needs_recalibration(method, {"batch_stats": {}}):
            relaxed.add(name)
        assert not needs_recalibration(method, {})
        assert not needs_recalibration(method, None)
    assert relaxed == {"gates"}


def test_the_harness_evaluates_gates_on_batch_norm_with_recalibrated_statistics(tmp_path):
    """A gates run on a conv net with batch norm reports the accuracy of its binary mask
    with statistics recomputed over the configured batches: the same number as the
    function gives on the saved state, and no RelaxedBatchNormWarning (tests/test_gates.py
    has the warning with 0 batches)."""
    from sparsejax.harness.prune_run import restore_run
    from sparsejax.harness.training.config import TrainConfig
    from sparsejax.harness.training.evaluation import evaluate, make_eval_step
    from sparsejax.harness.training.loop import train
    from sparsejax.harness.training.setup import RelaxedBatchNormWarning

    mnist = small_mnist(tmp_path / "mnist")  # real images, 1,000 + 500 of them

    config = TrainConfig(method="gates", sparsity=0.5, model="conv2", dataset="mnist",
                         data_dir=str(mnist), batch_size=8, steps=2, progress=False,
                         tensorboard=False, bn_recalibration_batches=3, out=str(tmp_path / "run"),
                         model_options={"norm": "batch", "norm_affine": False, "width": 0.25})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RelaxedBatchNormWarning)
        result = train(config)
    assert result["config"]["bn_recalibration_batches"] == 3
    finished = restore_run(tmp_path / "run")
    run, state = finished.run, finished.state
    params = jax.jit(run.method.effective_params)(state)
    images = recalibration_images(run.dataset.train_images, 3, 8, seed=0)
    eval_step = jax.jit(make_eval_step(run.model))
    recalibrated = recalibrated_batch_stats(run.model, params, state.model_state, images)
    expected = evaluate(eval_step, (params, recalibrated), run.dataset)
    assert result["test_accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert result["test_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    # ... and not what the running statistics give (a run that skipped the recomputation
    # would match this); the checkpoint keeps them: evaluation changes no state
    running = evaluate(eval_step, (params, state.model_state), run.dataset)
    assert result["test_loss"] != pytest.approx(running["loss"], rel=1e-3)
    assert not np.allclose(recalibrated["batch_stats"]["bn1"]["mean"],
                           state.model_state["batch_stats"]["bn1"]["mean"])
