"""A two-layer MLP (20 -> 16 -> 4) and a fixed batch stream, shared by the method tests;
and the ``fc1``/``head`` MLP on ``{"x", "y"}`` batches of the parallel, multi-process and
sharded tests (:func:`fc_params`, :func:`fc_loss`, :func:`build_toy_method`)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax
from sparsejax import make_train_step, stateless_loss
from sparsejax.engine.parallel import SingleDeviceTrainer


def mlp_params(key, scale=0.3):
    k1, k2 = jax.random.split(key)
    return {"Dense_0": {"kernel": jax.random.normal(k1, (20, 16)) * scale,
                        "bias": jnp.zeros(16)},
            "Dense_1": {"kernel": jax.random.normal(k2, (16, 4)) * scale, "bias": jnp.zeros(4)}}


def mlp_loss(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    logits = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(n):
    """``n`` batches of 32 examples: ``x`` of shape (n, 32, 20), labels (n, 32) in 0..3."""
    key = jax.random.PRNGKey(42)
    x = jax.random.normal(key, (n, 32, 20))
    y = jax.random.randint(jax.random.fold_in(key, 1), (n, 32), 0, 4)
    return x, y


def fc_params(n_in, n_hidden, n_out, *, scale=0.3, key=None):
    """``{"fc1", "head"}`` Dense params: normal kernels times ``scale`` drawn from the two
    halves of ``key`` (default ``jax.random.PRNGKey(0)``), zero biases."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0) if key is None else key)
    return {"fc1": {"kernel": jax.random.normal(k1, (n_in, n_hidden)) * scale,
                    "bias": jnp.zeros(n_hidden)},
            "head": {"kernel": jax.random.normal(k2, (n_hidden, n_out)) * scale,
                     "bias": jnp.zeros(n_out)}}


def fc_loss(p, batch):
    """Cross-entropy of the :func:`fc_params` MLP (ReLU) on ``batch["x"]``, ``batch["y"]``."""
    h = jax.nn.relu(batch["x"] @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def build_toy_method(name, options, *, total_steps=10, batches_per_epoch=None):
    """``sparsejax.get_method(name, sgd(0.1, momentum=0.9), **options)``, with
    ``total_steps`` (and ``batches_per_epoch`` when given) passed to the methods that
    take them."""
    options = dict(options)
    accepted = inspect.signature(sparsejax.METHODS[name]).parameters
    if "total_steps" in accepted:
        options["total_steps"] = total_steps
    if batches_per_epoch is not None and "batches_per_epoch" in accepted:
        options["batches_per_epoch"] = batches_per_epoch
    return sparsejax.get_method(name, optax.sgd(0.1, momentum=0.9), **options)


def assert_trainer_phases_match_update(method, n_steps, *, jump_at=None):
    """The trainer's two compiled steps (``method.phases``) give the states of the one
    traced ``method.update``, step by step: masks exactly, weights and optimizer slots
    to float rounding. The trainer must compile both phases and never ``update`` itself.
    With ``jump_at`` the trainer is handed, before that step, a state it did not return
    whose counter is one step further on (as on resume), so it must read the counter
    again."""
    assert method.phases is not None
    traced = set()  # which updates the trainer traced (each once, when first compiled)

    def recorded(phase, update):
        def run(state, grads):
            traced.add(phase)
            return update(state, grads)
        return run

    def not_this(state, grads):
        raise AssertionError("the trainer traced Method.update instead of its phases")

    for_trainer = method._replace(update=not_this, phases=method.phases._replace(
        train=recorded("train", method.phases.train), move=recorded("move", method.phases.move)))
    loss = stateless_loss(mlp_loss)
    reference_step = jax.jit(make_train_step(method, loss))
    trainer = SingleDeviceTrainer(for_trainer, loss)
    ref = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    state = jax.tree_util.tree_map(jnp.copy, ref)  # the trainer donates its input
    xs, ys = batches(n_steps)
    for i in range(n_steps):
        if i == jump_at:
            ref = ref.replace(step=ref.step + 1)
            state = jax.tree_util.tree_map(jnp.copy, ref)
        steps_done = int(ref.step) + 1
        ref, _ = reference_step(ref, (xs[i], ys[i]))
        state, _ = trainer.step(state, (xs[i], ys[i]))
        assert int(state.step) == int(ref.step) == steps_done
        for a, b in zip(jax.tree_util.tree_leaves(state.masks),
                        jax.tree_util.tree_leaves(ref.masks), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                          err_msg=f"step {steps_done}")
        for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)),
                        jax.tree_util.tree_leaves((ref.params, ref.opt_state)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {steps_done}")
    assert traced == {"train", "move"}  # both compiled steps ran, and nothing else
