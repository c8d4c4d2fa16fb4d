"""A two-layer MLP (20 -> 16 -> 4) and a fixed batch stream, shared by the method tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import make_train_step, stateless_loss
from sparsejax.training.parallel import SingleDeviceTrainer


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
