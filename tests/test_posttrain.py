"""Post-training pruning: SparseGPT's OBS update by hand, Wanda's mask by hand, exact
counts, reconstruction error against the baselines, and the sequential MLP driver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.core.topk import num_kept
from sparsejax.harness.models.mlp import MLP
from sparsejax.posttrain import kernels as posttrain_kernels
from sparsejax.posttrain import sequential as posttrain_sequential
from sparsejax.posttrain.pruners import (
    check_posttrain_pattern,
    input_hessian,
    magnitude_prune,
    prune_layer,
    prune_layer_hessian,
    reconstruction_error,
    sparsegpt_prune,
    wanda_prune,
)
from sparsejax.posttrain.sequential import prune_mlp_sequential

# 5 calibration tokens of 3 inputs, full rank and correlated
X3 = np.array([[1.0, 2.0, 0.5],
               [0.0, 1.0, 1.0],
               [2.0, 1.0, -1.0],
               [1.0, 0.0, 0.3],
               [0.5, 1.5, 1.0]])


def test_sparsegpt_one_pruned_column_is_the_obs_update():
    w = np.array([0.05, 2.0, -1.5])  # w_0 is by far the least salient
    h = X3.T @ X3
    h_inv = np.linalg.inv(h)
    q = 0
    # optimal brain surgeon, by hand: w' = w - (w_q / [H^-1]_qq) H^-1[:, q]
    obs = w - (w[q] / h_inv[q, q]) * h_inv[:, q]
    assert abs(obs[q]) < 1e-12
    # ... which is the least-squares best w' with w'_q = 0: min ||X w - X w'||
    rest = [1, 2]
    least_squares = np.zeros(3)
    least_squares[rest] = np.linalg.lstsq(X3[:, rest], X3 @ w, rcond=None)[0]
    np.testing.assert_allclose(obs, least_squares, rtol=1e-10, atol=1e-12)

    pruned = sparsegpt_prune(jnp.asarray(w[:, None], jnp.float32), jnp.asarray(X3, jnp.float32),
                             sparsity=1 / 3, percdamp=0.0)
    assert pruned.mask[:, 0].tolist() == [False, True, True]
    np.testing.assert_allclose(np.asarray(pruned.kernel[:, 0]), obs, rtol=1e-4, atol=1e-5)
    assert pruned.kernel[0, 0] == 0.0


def test_sparsegpt_walk_keeps_the_columns_already_processed():
    # Pruning column 1 after keeping column 0: only the columns after it may move, so the
    # best w'_2 with w'_0 = w_0 and w'_1 = 0 is w_2 + H_21 w_1 / H_22.
    w = np.array([2.0, 0.05, -1.5])
    h = X3.T @ X3
    expected = np.array([w[0], 0.0, w[2] + h[2, 1] * w[1] / h[2, 2]])
    pruned = sparsegpt_prune(jnp.asarray(w[:, None], jnp.float32), jnp.asarray(X3, jnp.float32),
                             sparsity=1 / 3, percdamp=0.0)
    assert pruned.mask[:, 0].tolist() == [True, False, True]
    np.testing.assert_allclose(np.asarray(pruned.kernel[:, 0]), expected, rtol=1e-4, atol=1e-5)


def test_sparsegpt_lazy_block_updates_match_one_block():
    # Blocks only batch the updates of later columns: with the mask fixed by N:M within
    # groups, blocksize 8 and blocksize 16 give the same weights.
    kernel, inputs = correlated_layer()
    small = sparsegpt_prune(kernel, inputs, "2:4", blocksize=8)
    whole = sparsegpt_prune(kernel, inputs, "2:4", blocksize=16)
    np.testing.assert_array_equal(small.mask, whole.mask)
    np.testing.assert_allclose(small.kernel, whole.kernel, rtol=1e-4, atol=1e-5)


def test_wanda_mask_is_the_hand_computed_top_per_output():
    kernel = np.array([[0.5, -2.0, 1.0],
                       [-1.0, 0.1, 3.0],
                       [2.0, 0.3, -0.2],
                       [0.4, 1.0, 0.6]], np.float32)  # (in=4, out=3)
    inputs = np.array([[1.0, 0.0, 2.0, 0.1],
                       [2.0, 1.0, 0.0, 0.1],
                       [0.0, 3.0, 1.0, 0.2]], np.float32)
    norms = np.sqrt((inputs.astype(np.float64) ** 2).sum(axis=0))  # per input
    scores = np.abs(kernel) * norms[:, None]
    expected = np.zeros_like(kernel, bool)
    for out in range(3):  # each output neuron keeps its 2 highest-scoring inputs
        expected[np.argsort(-scores[:, out])[:2], out] = True
    pruned = wanda_prune(kernel, inputs, "unstructured", 0.5)
    np.testing.assert_array_equal(np.asarray(pruned.mask), expected)
    np.testing.assert_array_equal(np.asarray(pruned.kernel), np.where(expected, kernel, 0))
    # 2:4 on the same scores: one group of 4 inputs per output, the same choice here
    np.testing.assert_array_equal(wanda_prune(kernel, inputs, "2:4").mask, expected)
    # one comparison group for the whole layer: the top 6 of all 12 scores
    per_layer = np.zeros(kernel.size, bool)
    per_layer[np.argsort(-scores.ravel(), kind="stable")[:6]] = True
    np.testing.assert_array_equal(wanda_prune(kernel, inputs, sparsity=0.5,
                                              per_output=False).mask,
                                  per_layer.reshape(kernel.shape))
    assert not np.array_equal(per_layer.reshape(kernel.shape), expected)
    # ... and it differs from magnitude, which ignores the inputs
    assert not np.array_equal(magnitude_prune(kernel, "2:4").mask, expected)


def correlated_layer(n_in=16, n_out=6, tokens=128, seed=0):
    """A layer whose inputs lie near an 4-dimensional subspace, as real activations lie
    near a low-dimensional one (the regime SparseGPT's weight updates are made for), with
    inputs of unequal scale (so Wanda's norms matter)."""
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(seed), 5)
    latent = jax.random.normal(k1, (tokens, 4)) @ jax.random.normal(k2, (4, n_in))
    inputs = latent + 0.3 * jax.random.normal(k3, (tokens, n_in))
    inputs = inputs * jnp.exp(jax.random.uniform(k4, (n_in,), minval=-1.0, maxval=1.0))
    kernel = jax.random.normal(k5, (n_in, n_out)) / np.sqrt(n_in)
    return kernel, inputs


def reference_sparsegpt(kernel, inputs, keep_count, blocksize, nm=None, percdamp=0.0):
    """SparseGPT from the OBS formulas, in float64 and without any Cholesky factor or
    lazy update. H = X^T X, with H_jj = 1 for an input the data never uses, is dampened
    by ``percdamp`` times its mean diagonal (REFERENCES.md). Then for each column j
    (paper layout, W = kernel.T), with F = {j, j+1, ...}
    the columns not yet processed, [H_F^-1] = inv(H[F, F]); the saliency of column k
    is w_k^2 / inv(H[k:, k:])[0, 0], the mask is chosen at each block's (or group's)
    start, and pruning w_j adds -(w_j / [H_F^-1]_jj) [H_F^-1]_{j, :} to the columns F."""
    w = np.asarray(kernel, np.float64).T.copy()
    x = np.asarray(inputs, np.float64)
    h = x.T @ x
    h[np.diag_indices_from(h)] += np.diagonal(h) == 0
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diagonal(h))
    n_out, n_in = w.shape
    keep = np.ones_like(w, bool)

    def saliency(k):
        return w[:, k] ** 2 / np.linalg.inv(h[k:, k:])[0, 0]

    for j in range(n_in):
        if nm is None and j % blocksize == 0:
            cols = range(j, min(j + blocksize, n_in))
            scores = np.stack([saliency(k) for k in cols], axis=1)
            order = np.argsort(-scores.ravel(), kind="stable")
            block = np.zeros(scores.size, bool)
            block[order[:keep_count(scores.size)]] = True
            keep[:, j:j + len(cols)] = block.reshape(scores.shape)
        if nm is not None and j % nm[1] == 0:
            scores = np.stack([saliency(k) for k in range(j, j + nm[1])], axis=1)
            for r in range(n_out):
                group = np.zeros(nm[1], bool)
                group[np.argsort(-scores[r], kind="stable")[:nm[0]]] = True
                keep[r, j:j + nm[1]] = group
        inverse = np.linalg.inv(h[j:, j:])
        pruned = ~keep[:, j]
        w[pruned, j:] -= (w[pruned, j] / inverse[0, 0])[:, None] * inverse[0][None, :]
        w[pruned, j] = 0.0
    return w.T, keep.T


@pytest.mark.parametrize("percdamp", [0.0, 0.01])  # 0.01: the default
@pytest.mark.parametrize("pattern,sparsity,blocksize", [("unstructured", 0.6, 8),
                                                        ("2:4", None, 8),
                                                        # 16 inputs: a block of 12, and a
                                                        # narrower last one of 4
                                                        ("unstructured", 0.6, 12),
                                                        ("2:4", None, 12)])
def test_sparsegpt_matches_a_float64_reference_from_the_formulas(pattern, sparsity,
                                                                 blocksize, percdamp):
    kernel, inputs = correlated_layer()
    expected, expected_mask = reference_sparsegpt(
        kernel, inputs, lambda size: num_kept(1 - 0.6, size), blocksize,
        nm=(2, 4) if pattern == "2:4" else None, percdamp=percdamp)
    pruned = sparsegpt_prune(kernel, inputs, pattern, sparsity, blocksize=blocksize,
                             percdamp=percdamp)
    np.testing.assert_array_equal(np.asarray(pruned.mask), expected_mask)
    np.testing.assert_allclose(np.asarray(pruned.kernel), expected, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern, sparsity):
    kernel, inputs = correlated_layer()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned = prune_layer(method, kernel, inputs, pattern, sparsity, **(
            {"blocksize": 8} if method == "sparsegpt" else {}))
        assert int(pruned.mask.sum()) == kernel.size // 2
        assert bool(jnp.all(pruned.kernel[~pruned.mask] == 0))
        errors[method] = float(reconstruction_error(kernel, pruned.kernel, inputs))
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors
    assert errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_counts_are_exact_per_block_and_per_group():
    kernel, inputs = correlated_layer()
    pruned = sparsegpt_prune(kernel, inputs, sparsity=0.7, blocksize=12)  # blocks 12 + 4
    mask = np.asarray(pruned.mask)
    assert mask[:12].sum() == num_kept(0.3, 12 * 6) and mask[12:].sum() == num_kept(0.3, 4 * 6)
    nm = np.asarray(sparsegpt_prune(kernel, inputs, "4:8", blocksize=8).mask)
    assert np.all(nm.reshape(2, 8, 6).sum(axis=1) == 4)


def test_dead_inputs_are_pruned_first_and_hessian_is_gram():
    kernel, inputs = correlated_layer()
    inputs = inputs.at[:, 3].set(0.0)  # an input the calibration data never uses
    np.testing.assert_allclose(input_hessian(inputs), inputs.T @ inputs, rtol=1e-4, atol=1e-3)
    pruned = sparsegpt_prune(kernel, inputs, sparsity=0.5, blocksize=8)
    assert not bool(pruned.mask[3].any())
    assert bool(jnp.all(jnp.isfinite(pruned.kernel)))


@pytest.mark.parametrize("call,message", [
    (lambda k, x: sparsegpt_prune(k, x, "block:2", 0.5), "unstructured and N:M"),
    (lambda k, x: sparsegpt_prune(k, x, "2:4", blocksize=6), "multiple of M=4"),
    (lambda k, x: sparsegpt_prune(k, x, "2:4@-1"), "input axis"),
    (lambda k, x: sparsegpt_prune(k, x, "unstructured"), "needs a sparsity"),
    (lambda k, x: sparsegpt_prune(k, x, "2:4", 0.3), "fixes the density at 0.5"),
    (lambda k, x: sparsegpt_prune(k, x, sparsity=1.0), r"sparsity must lie in \[0, 1\)"),
    (lambda k, x: sparsegpt_prune(k, x, sparsity=0.5, percdamp=-1.0), "percdamp"),
    (lambda k, x: wanda_prune(k, x[:, :4], sparsity=0.5), "input size 8"),
    (lambda k, x: wanda_prune(k[None], x, sparsity=0.5), r"Dense kernel \(in, out\)"),
    (lambda k, x: prune_layer("obs", k, x, sparsity=0.5), "unknown post-training method"),
    (lambda k, x: prune_layer("wanda", k, None, sparsity=0.5), "needs calibration inputs"),
])
def test_bad_calls_are_named_errors(call, message):
    kernel, inputs = correlated_layer(n_in=8, n_out=4, tokens=16)
    kernel, inputs = np.asarray(kernel), np.asarray(inputs)
    with pytest.raises(ValueError, match=message):
        call(kernel, inputs)


def test_sequential_driver_feeds_each_layer_the_pruned_outputs():
    model = MLP(num_classes=4, hidden=(16, 8))
    params = model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]
    calibration = jax.random.normal(jax.random.key(1), (40, 3, 4))  # flattened to 12
    pruned, report = prune_mlp_sequential(params, calibration, "wanda", "2:4")
    assert [r.name for r in report] == ["fc1", "fc2", "head"]
    assert all(r.density == 0.5 for r in report)
    # by hand: each layer pruned on the outputs of the pruned layers before it
    x = calibration.reshape(40, 12)
    inputs = []
    for name in ("fc1", "fc2", "head"):
        inputs.append(x)
        expected = wanda_prune(params[name]["kernel"], x, "2:4")
        np.testing.assert_array_equal(pruned[name]["kernel"], expected.kernel)
        np.testing.assert_array_equal(pruned[name]["bias"], params[name]["bias"])
        x = jax.nn.relu(x @ expected.kernel + params[name]["bias"])
    errors = [float(reconstruction_error(params[r.name]["kernel"], pruned[r.name]["kernel"],
                                         x_in)) for r, x_in in zip(report, inputs, strict=True)]
    np.testing.assert_allclose([r.reconstruction_error for r in report], errors, rtol=1e-5)
    assert model.apply({"params": pruned}, calibration).shape == (40, 4)


def test_sequential_driver_names_the_layer_that_does_not_fit():
    params = MLP(num_classes=3, hidden=(8,)).init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    with pytest.raises(ValueError, match="fc1/kernel|head/kernel"):
        prune_mlp_sequential(params, jnp.ones((4, 8)), "magnitude", "block:4", 0.5)
    with pytest.raises(ValueError, match="fc1 ... fcN and head"):
        prune_mlp_sequential({"Dense_0": params["fc1"]}, jnp.ones((4, 8)), "magnitude",
                             "unstructured", 0.5)


def test_sequential_driver_checks_method_and_pattern_before_any_hessian(monkeypatch):
    params = MLP(num_classes=4, hidden=(8,)).init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
    x = jnp.ones((4, 16))
    forwards = []
    monkeypatch.setattr(posttrain_sequential, "_batch_hessian",
                        lambda *args: forwards.append(args) or None)
    for pattern, options, message in [
            ("channel", {}, "fc1/kernel: sparsegpt supports the unstructured and N:M patterns,"
                            " got channel"),
            ("block:4", {}, "fc1/kernel: sparsegpt supports .* got block:4"),
            ("2:4", {"blocksize": 6}, "fc1/kernel: blocksize 6 must be a multiple of M=4"),
            ("2:4", {"blocksize": 0}, "fc1/kernel: blocksize must be")]:
        with pytest.raises(ValueError, match=message):
            prune_mlp_sequential(params, x, "sparsegpt", pattern, 0.5, **options)
    with pytest.raises(ValueError, match="unknown post-training method 'obs'"):
        prune_mlp_sequential(params, x, "obs", "channel", 0.5)
    assert forwards == []  # every refusal came before the first Hessian forward
    assert check_posttrain_pattern("wanda", "channel").kind == "channel"
    with pytest.raises(ValueError, match="unknown post-training method 'obs'"):
        prune_layer_hessian("obs", jnp.ones((4, 2)), jnp.eye(4), sparsity=0.5)


def test_prune_command_checks_method_and_pattern_first(tmp_path):
    import argparse

    from sparsejax.harness.prune_run import add_commands, prune_run

    # refused before the run folder (here empty) is even read
    with pytest.raises(ValueError, match="sparsegpt supports the unstructured and N:M"):
        prune_run(tmp_path, "sparsegpt", "channel", 0.5)
    with pytest.raises(ValueError, match="unknown post-training method 'obs'"):
        prune_run(tmp_path, "obs", "2:4")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    prune = parser._subparsers._group_actions[0].choices["prune"]
    help_text = next(a.help for a in prune._actions if a.dest == "pattern")
    assert "block:B or channel (magnitude and wanda only)" in help_text


def test_sequential_driver_takes_one_pattern_per_layer_and_checks_all_first(monkeypatch):
    params = MLP(num_classes=4, hidden=(8,)).init(jax.random.key(0), jnp.zeros((1, 16)))["params"]
    x = jax.random.normal(jax.random.key(1), (20, 16))
    pruned, report = prune_mlp_sequential(params, x, "magnitude", {"fc1": "4:8", "head": "2:4"})
    assert np.all(np.asarray(pruned["fc1"]["kernel"] != 0).reshape(2, 8, 8).sum(axis=1) == 4)
    assert np.all(np.asarray(pruned["head"]["kernel"] != 0).reshape(2, 4, 4).sum(axis=1) == 2)
    with pytest.raises(ValueError, match="must name every layer"):
        prune_mlp_sequential(params, x, "magnitude", {"fc1": "4:8"})
    with pytest.raises(ValueError, match="unknown post-training method"):
        prune_mlp_sequential(params, x, "obs", "2:4")
    # head does not fit: refused before fc1 is pruned
    pruned_layers = []
    monkeypatch.setattr(posttrain_kernels, "prune_layer_hessian",
                        lambda *args, **kw: pruned_layers.append(args) or None)
    with pytest.raises(ValueError, match="head/kernel: .*not divisible by 16"):
        prune_mlp_sequential(params, x, "wanda", {"fc1": "8:16", "head": "8:16"})
    assert pruned_layers == []


def test_a_registered_algorithm_that_leaves_pruned_weights_non_zero_is_refused():
    """prune_layer (and so the sequential driver and `sparsejax prune`) checks what a
    registered algorithm returns: a pruned weight left non-zero, or no PrunedLayer, is a
    ValueError naming the algorithm, not a silently denser kernel."""
    from sparsejax.posttrain.pruners import PrunedLayer, prune_layer
    from sparsejax.posttrain.registry import (
        POSTTRAIN_METHODS,
        PosttrainPruner,
        register_posttrain_method,
    )

    def leaky(kernel, data, pattern="unstructured", sparsity=None):
        mask = jnp.arange(kernel.size).reshape(kernel.shape) % 2 == 0
        return PrunedLayer(kernel, mask)  # forgot to zero the pruned half

    def untyped(kernel, data, pattern="unstructured", sparsity=None):
        return jnp.zeros_like(kernel), jnp.ones(kernel.shape, bool)

    kernel = jnp.arange(1.0, 9.0).reshape(4, 2)
    try:
        register_posttrain_method("leaky", PosttrainPruner(leaky, leaky))
        register_posttrain_method("untyped", PosttrainPruner(untyped, untyped))
        with pytest.raises(ValueError, match="'leaky' left weights non-zero"):
            prune_layer("leaky", kernel, None, sparsity=0.5)
        with pytest.raises(ValueError, match="'untyped' must return a PrunedLayer"):
            prune_layer("untyped", kernel, None, sparsity=0.5)
    finally:
        POSTTRAIN_METHODS.pop("leaky", None)
        POSTTRAIN_METHODS.pop("untyped", None)
    assert int(prune_layer("magnitude", kernel, None, sparsity=0.5).mask.sum()) == 4
