"""Block-by-block post-training pruning (issue #30): prune_blocks on linen and NNX models,
its two granularities against prune_sequential and hand-captured inputs, the forwards it
runs, its refusals, and SparseGPT's dead inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.core.masks import default_prunable
from sparsejax.core.patterns import nm_groups
from sparsejax.harness.models.gpt import GPT
from sparsejax.posttrain import kernels as posttrain_kernels
from sparsejax.posttrain.blocks import prune_blocks
from sparsejax.posttrain.capture import capture_dense_inputs, capture_linear_inputs
from sparsejax.posttrain.pruners import (
    input_hessian,
    prune_layer,
    reconstruction_error,
    sparsegpt_prune,
)
from sparsejax.posttrain.sequential import prune_sequential

VOCAB, CONTEXT = 11, 8
BLOCKS = ["block1", "block2"]
LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2"]


@pytest.fixture(scope="module")
def gpt():
    model = GPT(num_classes=VOCAB, n_layer=2, n_embd=16, n_head=2, context=CONTEXT)
    params = model.init(jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))["params"]
    tokens = jax.random.randint(jax.random.key(1), (6, CONTEXT), 0, VOCAB)
    return model, params, tokens


def _leaf(tree, name):
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _not_head(name, leaf):
    return default_prunable(name, leaf) and not name.startswith("head/")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_within_blocks_equals_prune_sequential(gpt, method):
    model, params, tokens = gpt
    expected, expected_report = prune_sequential(model, params, tokens, method, "2:4",
                                                 batch_size=3, prunable=_not_head)
    pruned, report = prune_blocks(model, params, tokens, method, "2:4", blocks=BLOCKS,
                                  within="sequential", batch_size=3)
    assert [r.name for r in report] == [f"{b}/{n}" for b in BLOCKS for n in LAYERS]
    assert [r.name for r in report] == [r.name for r in expected_report]
    np.testing.assert_allclose([r.reconstruction_error for r in report],
                               [r.reconstruction_error for r in expected_report], rtol=1e-4)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(pruned)[0],
                            jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a) != 0, np.asarray(b) != 0, err_msg=str(path))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(path))
    # the head and the embeddings stay dense, as in the reference code
    for name in ("head/kernel", "token_embed/embedding", "pos_embed/embedding"):
        np.testing.assert_array_equal(_leaf(pruned, name), _leaf(params, name))


def test_block_inputs_calibrates_every_layer_on_the_dense_block(gpt, monkeypatch):
    model, params, tokens = gpt
    hessians = []
    real = posttrain_kernels.prune_layer_hessian

    def recording(method, kernel, hessian, *args, **kwargs):
        hessians.append(hessian)
        return real(method, kernel, hessian, *args, **kwargs)

    monkeypatch.setattr(posttrain_kernels, "prune_layer_hessian", recording)
    pruned, report = prune_blocks(model, params, tokens, "sparsegpt", "unstructured", 0.5,
                                  blocks=BLOCKS)
    sequential, _ = prune_blocks(model, params, tokens, "sparsegpt", "unstructured", 0.5,
                                 blocks=BLOCKS, within="sequential")
    hessians = hessians[:len(report)]
    # by hand: block k's inputs come from the pruned blocks before it and the dense block k
    for k, block in enumerate(BLOCKS):
        mixed = {**params, **{b: pruned[b] for b in BLOCKS[:k]}}
        paths = [(block, *n.split("/")) for n in LAYERS]
        inputs = capture_dense_inputs(model, {"params": mixed}, tokens, layers=paths)
        for i, name in enumerate(LAYERS):
            x = inputs[paths[i]]
            row = report[k * len(LAYERS) + i]
            assert row.name == f"{block}/{name}"
            np.testing.assert_allclose(hessians[k * len(LAYERS) + i], input_hessian(x),
                                       rtol=1e-4, atol=1e-4)
            kernel = _leaf(params, f"{block}/{name}/kernel")
            expected = prune_layer("sparsegpt", kernel, x, "unstructured", 0.5).kernel
            got = _leaf(pruned, f"{block}/{name}/kernel")
            np.testing.assert_array_equal(np.asarray(got) != 0, np.asarray(expected) != 0)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(row.reconstruction_error,
                                       reconstruction_error(kernel, got, x), rtol=1e-3)
    # within the block the two granularities differ (attn/out saw the pruned q, k, v)
    assert not np.allclose(_leaf(pruned, "block1/attn/out/kernel"),
                           _leaf(sequential, "block1/attn/out/kernel"))
    np.testing.assert_allclose(_leaf(pruned, "block1/attn/query/kernel"),
                               _leaf(sequential, "block1/attn/query/kernel"), atol=1e-6)


class _Attention(nnx.Module):
    def __init__(self, dim, heads, rngs):
        self.heads = heads
        self.query, self.key, self.value, self.out = (
            nnx.Linear(dim, dim, use_bias=False, rngs=rngs) for _ in range(4))

    def __call__(self, x, mask):
        b, t, d = x.shape
        q, k, v = (f(x).reshape(b, t, self.heads, d // self.heads)
                   for f in (self.query, self.key, self.value))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        att = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d))


class _Block(nnx.Module):
    def __init__(self, dim, rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(dim, rngs=rngs), nnx.RMSNorm(dim, rngs=rngs)
        self.attn = _Attention(dim, 2, rngs)
        self.up, self.down = nnx.Linear(dim, 2 * dim, rngs=rngs), nnx.Linear(2 * dim, dim,
                                                                             rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.down(nnx.silu(self.up(self.norm2(x))))


class _Decoder(nnx.Module):
    """A decoder written by hand in NNX: no sparsejax model class."""

    def __init__(self, vocab, dim, depth, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.layers = nnx.List([_Block(dim, rngs) for _ in range(depth)])
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x)


NNX_LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "up", "down"]


@pytest.mark.parametrize("method,pattern,sparsity", [("sparsegpt", "unstructured", 0.5),
                                                     ("sparsegpt", "2:4", None),
                                                     ("wanda", "unstructured", 0.5)])
def test_a_hand_written_nnx_decoder_is_pruned_block_by_block(method, pattern, sparsity):
    model = _Decoder(VOCAB, 16, 2, nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    tokens = jax.random.randint(jax.random.key(1), (4, CONTEXT), 0, VOCAB)
    pruned, report = prune_blocks(model, None, tokens, method, pattern, sparsity,
                                  blocks=["layers/0", ("layers", 1)])
    assert [r.name for r in report] == [f"layers/{i}/{n}" for i in (0, 1) for n in NNX_LAYERS]
    assert {r.density for r in report} == {0.5}
    for i in (0, 1):
        for name in NNX_LAYERS:
            node = pruned.layers[i]
            for key in name.split("/"):
                node = getattr(node, key)
            kernel = np.asarray(node.kernel[...])
            assert (kernel != 0).sum() == kernel.size // 2  # exact count
            if pattern == "2:4":
                assert np.all(np.asarray(nm_groups(kernel != 0, "2:4").sum(axis=1)) == 2)
    # the user's model is untouched; the head and the embedding of the copy stay dense
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    np.testing.assert_array_equal(pruned.head.kernel[...], model.head.kernel[...])
    np.testing.assert_array_equal(pruned.embed.embedding[...], model.embed.embedding[...])
    assert pruned(tokens).shape == (4, CONTEXT, VOCAB)
    # the first block by hand: every layer pruned on the dense block's inputs
    mask = jnp.tril(jnp.ones((CONTEXT, CONTEXT), bool))
    inputs = capture_linear_inputs(model.layers[0], model.embed(tokens), mask)
    kernel = prune_layer(method, model.layers[0].up.kernel[...], inputs[("up",)], pattern,
                         sparsity).kernel
    np.testing.assert_allclose(pruned.layers[0].up.kernel[...], kernel, rtol=1e-4, atol=1e-5)


class _Counted(nn.Module):
    """A block whose every run (jitted or not) adds one to ``COUNTS[tag]``."""

    tag: int

    @nn.compact
    def __call__(self, x):
        jax.debug.callback(lambda: COUNTS.__setitem__(self.tag, COUNTS.get(self.tag, 0) + 1))
        for name in ("fc1", "fc2", "fc3"):  # three layers, each on its own input
            x = nn.tanh(nn.Dense(8, name=name)(x))
        return x


class _Stack(nn.Module):
    skip_last: bool = False

    @nn.compact
    def __call__(self, x):
        jax.debug.callback(lambda: COUNTS.__setitem__("model", COUNTS.get("model", 0) + 1))
        x = nn.Dense(8, name="embed")(x)
        for i in range(3):
            if not (self.skip_last and i == 2):
                x = _Counted(i, name=f"block{i}")(x)
        return nn.Dense(2, name="head")(x)


COUNTS: dict = {}
STACK_BLOCKS = ["block0", "block1", "block2"]


def _stack():
    x = jax.random.normal(jax.random.key(2), (12, 8))
    return _Stack(), _Stack().init(jax.random.key(0), x)["params"], x


def test_each_block_runs_once_for_its_hessians_and_once_for_its_outputs():
    model, params, x = _stack()
    batches = 3  # batch_size 4

    def counts(run):
        COUNTS.clear()
        run()
        jax.effects_barrier()
        return dict(COUNTS)

    seen = counts(lambda: prune_blocks(model, params, x, "wanda", "unstructured", 0.5,
                                       blocks=STACK_BLOCKS, batch_size=4))
    # the model once (up to the first block); each block once for its Hessians and once
    # for its outputs (the last block: no outputs needed), whatever its number of layers
    assert seen == {"model": batches, 0: 2 * batches, 1: 2 * batches, 2: batches}
    seen = counts(lambda: prune_blocks(model, params, x, "wanda", "unstructured", 0.5,
                                       blocks=STACK_BLOCKS, batch_size=4, within="sequential"))
    assert seen == {"model": batches, 0: 4 * batches, 1: 4 * batches, 2: 3 * batches}
    # the model-level driver runs the model from its input for each of the 9 layers
    seen = counts(lambda: prune_sequential(
        model, params, x, "wanda", "unstructured", 0.5, batch_size=4,
        prunable=lambda name, leaf: name.startswith("block") and default_prunable(name, leaf)))
    assert seen == {"model": 9 * batches, 0: 9 * batches, 1: 6 * batches, 2: 3 * batches}


def test_refusals_are_named_value_errors(gpt):
    model, params, tokens = gpt

    def prune(**kwargs):
        options = {"blocks": BLOCKS, **kwargs}
        return prune_blocks(model, params, tokens, "wanda", "2:4", **options)

    with pytest.raises(ValueError, match="block block9 does not exist"):
        prune(blocks=["block1", "block9"])
    with pytest.raises(ValueError, match="head/kernel is prunable but lies outside the blocks"
                                         r" \['block1', 'block2'\].*dense"):
        prune(prunable=default_prunable)
    with pytest.raises(ValueError, match="in the order .*block1.*block2.*not"):
        prune(blocks=["block2", "block1"])
    with pytest.raises(ValueError, match="overlap"):
        prune(blocks=["block1", "block1/attn"])
    with pytest.raises(ValueError, match="within must be one of"):
        prune(within="layers")
    with pytest.raises(ValueError, match="non-empty list"):
        prune(blocks="block1")
    # a block the forward never calls (linen: not on this call's path; NNX: never used)
    stack, stack_params, x = _stack()
    with pytest.raises(ValueError, match="block block2 is called 0 times per forward"):
        prune_blocks(_Stack(skip_last=True), stack_params, x, "wanda", "2:4",
                     blocks=STACK_BLOCKS)
    decoder = _Decoder(VOCAB, 8, 2, nnx.Rngs(0))
    decoder.spare = _Block(8, nnx.Rngs(1))
    with pytest.raises(ValueError, match="block spare is called 0 times"):
        prune_blocks(decoder, None, tokens, "wanda", "2:4", blocks=["layers/0", "spare"])
    with pytest.raises(ValueError, match="block layers/7 does not exist"):
        prune_blocks(decoder, None, tokens, "wanda", "2:4", blocks=["layers/7"])
    # a block not fed the previous block's output (x + block(x)), a conv inside a block

    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + _Counted(0, name="block0")(x)
            return _Counted(1, name="block1")(x)

    with pytest.raises(ValueError, match="block1 is not called on the output of block block0"):
        prune_blocks(Residual(), Residual().init(jax.random.key(0), x)["params"], x, "wanda",
                     "2:4", blocks=["block0", "block1"])

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="fc")(nn.Conv(4, (3,), name="conv")(x))

    class WithConv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Conv(name="block")(x)

    x3 = jnp.ones((2, 8, 4))
    with pytest.raises(ValueError, match="block/conv/kernel is prunable but is not the kernel"):
        prune_blocks(WithConv(), WithConv().init(jax.random.key(0), x3)["params"], x3,
                     "wanda", "2:4", blocks=["block"])


def test_sparsegpt_zeroes_dead_inputs_as_the_reference_does():
    """80 of 128 inputs never active in calibration (H_jj == 0): the reference code sets
    their weights to zero, so the layer keeps 48/128 = 37.5% where 50% was asked; with
    zero_dead_inputs=False the count stays exact, the rest kept on dead inputs."""
    kernel = jax.random.normal(jax.random.key(0), (128, 4))
    inputs = jax.random.normal(jax.random.key(1), (256, 128))
    dead = np.arange(128) % 8 < 5  # 80 dead inputs
    inputs = jnp.where(dead[None, :], 0.0, inputs)
    pruned = sparsegpt_prune(kernel, inputs, "unstructured", 0.5)
    assert float(pruned.mask.mean()) == 0.375
    assert not np.asarray(pruned.kernel)[dead].any() and not np.asarray(pruned.mask)[dead].any()
    kept = sparsegpt_prune(kernel, inputs, "unstructured", 0.5, zero_dead_inputs=False)
    assert float(kept.mask.mean()) == 0.5
    # the live weights are the same either way; kept dead weights keep their values
    np.testing.assert_allclose(kept.kernel[~dead], pruned.kernel[~dead], rtol=1e-5, atol=1e-6)
    on = np.asarray(kept.mask) & dead[:, None]
    assert on.any()
    np.testing.assert_array_equal(np.asarray(kept.kernel)[on], np.asarray(kernel)[on])
    # 2:4: groups of dead inputs keep fewer than 2 (5 of every 8 inputs dead)
    nm = sparsegpt_prune(kernel, inputs, "2:4")
    assert np.all(np.asarray(nm_groups(nm.mask, "2:4").sum(axis=1)) <= 2)
    assert float(nm.mask.mean()) < 0.5
    assert float(sparsegpt_prune(kernel, inputs, "2:4", zero_dead_inputs=False).mask.mean()) == 0.5


class _Pair(nn.Module):
    """A block returning ``(x, aux)`` and taking a keyword the model passes to all."""

    @nn.compact
    def __call__(self, x, *, scale):
        y = nn.Dense(8, name="fc")(x) * scale
        return y, jnp.mean(y)


class _PairStack(nn.Module):
    vary: bool = False

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x, _ = _Pair(name=f"block{i}")(x, scale=1.0 + i if self.vary else 0.5)
        return x


def test_a_block_returning_a_tuple_feeds_its_first_element_and_others_are_checked():
    x = jax.random.normal(jax.random.key(3), (16, 8))
    params = _PairStack().init(jax.random.key(0), x)["params"]
    pruned, report = prune_blocks(_PairStack(), params, x, "wanda", "unstructured", 0.5,
                                  blocks=["block0", "block1"])
    hidden = nn.Dense(8).apply({"params": pruned["block0"]["fc"]}, x) * 0.5
    expected = prune_layer("wanda", params["block1"]["fc"]["kernel"], hidden, "unstructured",
                           0.5).kernel
    np.testing.assert_allclose(pruned["block1"]["fc"]["kernel"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="block block1 gets other arguments than block block0"):
        prune_blocks(_PairStack(vary=True), params, x, "wanda", "unstructured", 0.5,
                     blocks=["block0", "block1"])
