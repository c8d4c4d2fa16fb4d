"""Capturing Dense inputs (linen and NNX) and the general sequential driver (issue #20)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.core.patterns import nm_groups
from sparsejax.harness.models.gpt import GPT
from sparsejax.posttrain.capture import capture_dense_inputs, capture_linear_inputs, dense_calls
from sparsejax.posttrain.pruners import input_hessian, prune_layer
from sparsejax.posttrain.sequential import prune_sequential

VOCAB, CONTEXT = 11, 8
ORDER = ["block1/attn/query", "block1/attn/key", "block1/attn/value", "block1/attn/out",
         "block1/fc1", "block1/fc2", "head"]


@pytest.fixture(scope="module")
def gpt():
    model = GPT(num_classes=VOCAB, n_layer=1, n_embd=16, n_head=2, context=CONTEXT)
    # one jitted init: eagerly every op of it compiled a program of its own
    params = jax.jit(model.init)(jax.random.key(0),
                                 jnp.zeros((1, CONTEXT), jnp.int32))["params"]
    tokens = jax.random.randint(jax.random.key(1), (6, CONTEXT), 0, VOCAB)
    return model, params, tokens


@pytest.fixture(scope="module")
def pruned_2_4(gpt):
    """``prune_sequential(model, params, tokens, method, "2:4")`` of the GPT, run once per
    method in this module (the Hessian and the driver tests both read SparseGPT's)."""
    model, params, tokens = gpt
    runs = {}

    def get(method):
        if method not in runs:
            runs[method] = prune_sequential(model, params, tokens, method, "2:4")
        return runs[method]

    return get


def _by_hand(params, tokens):
    """The inputs of the GPT's Dense layers, from a forward written out by hand."""
    def norm(p, x):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]

    def dense(p, x):
        return x @ p["kernel"] + p["bias"]

    block = params["block1"]
    h = params["token_embed"]["embedding"][tokens] + params["pos_embed"]["embedding"][:CONTEXT]
    a = norm(block["norm1"], h)
    att = block["attn"]
    q, k, v = (dense(att[n], a).reshape(*a.shape[:2], 2, 8) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0)
    logits = jnp.where(jnp.tril(jnp.ones((CONTEXT, CONTEXT), bool)), logits, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v).reshape(a.shape)
    h = h + dense(att["out"], o)
    m = norm(block["norm2"], h)
    g = nn.gelu(dense(block["fc1"], m))
    h = h + dense(block["fc2"], g)
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    return {"block1/attn/query": flat(a), "block1/attn/key": flat(a),
            "block1/attn/value": flat(a), "block1/attn/out": flat(o), "block1/fc1": flat(m),
            "block1/fc2": flat(g), "head": flat(norm(params["norm"], h))}


def test_linen_capture_is_every_dense_input_in_call_order(gpt):
    model, params, tokens = gpt
    captured = jax.jit(lambda p, t: capture_dense_inputs(model, {"params": p}, t))(params, tokens)
    eager = capture_dense_inputs(model, {"params": params}, tokens)
    assert ["/".join(p) for p in eager] == ORDER  # call order (the jitted dict is sorted)
    expected = _by_hand(params, tokens)
    for path, x in captured.items():
        assert x.shape == (6 * CONTEXT, expected["/".join(path)].shape[1])
        np.testing.assert_allclose(x, expected["/".join(path)], rtol=2e-4, atol=2e-5)
    # flax's own capture_intermediates records each Dense's output: input @ W + b
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: isinstance(m, nn.Dense))
    for path, x in eager.items():
        node, layer = state["intermediates"], params
        for key in path:
            node, layer = node[key], layer[key]
        output = node["__call__"][0]
        np.testing.assert_allclose(x @ layer["kernel"] + layer["bias"],
                                   output.reshape(-1, output.shape[-1]), rtol=1e-5, atol=1e-5)
    only = capture_dense_inputs(model, {"params": params}, tokens, layers=[("block1", "fc2")])
    assert list(only) == [("block1", "fc2")]
    np.testing.assert_array_equal(only[("block1", "fc2")], eager[("block1", "fc2")])
    calls = dense_calls(model, {"params": params}, tokens)
    assert [c.group for c in calls] == [0, 0, 0, 3, 4, 5, 6]  # q, k, v share one input
    assert [c.features_in for c in calls] == [16, 16, 16, 16, 16, 64, 16]
    with pytest.raises(ValueError, match="no Dense layer at block9"):
        capture_dense_inputs(model, {"params": params}, tokens, layers=[("block9",)])


class _NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.encoder = nnx.Linear(3, 5, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(5, 5, rngs=rngs), nnx.Linear(5, 5, rngs=rngs)])
        self.head = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.encoder(x))
        x = self.blocks[1](x) + self.blocks[0](x)  # called in the order 1, 0
        return self.head(nnx.tanh(x))


def test_nnx_capture_is_every_linear_input_in_call_order():
    model = _NnxNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (4, 2, 3))
    captured = capture_linear_inputs(model, x)
    assert list(captured) == [("encoder",), ("blocks", "1"), ("blocks", "0"), ("head",)]
    flat = x.reshape(-1, 3)
    hidden = nnx.relu(model.encoder(flat))
    expected = [flat, hidden, hidden, nnx.tanh(model.blocks[1](hidden) + model.blocks[0](hidden))]
    for got, want in zip(captured.values(), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert nnx.Linear.__call__.__name__ == "__call__"  # the wrapper is gone again
    assert list(capture_linear_inputs(model, x, layers=[("head",)])) == [("head",)]


class _KeywordMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(4, name="fc1")(inputs=x))  # the input as a keyword
        return nn.Dense(2, name="head")(h)


class _KeywordNnx(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1, self.head = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(inputs=nnx.relu(self.fc1(inputs=x)))


def test_capture_takes_the_input_given_as_the_inputs_keyword():
    x = jax.random.normal(jax.random.key(3), (5, 3))
    model = _KeywordMLP()
    variables = model.init(jax.random.key(0), x)
    captured = capture_dense_inputs(model, variables, x)
    hidden = nn.relu(x @ variables["params"]["fc1"]["kernel"] + variables["params"]["fc1"]["bias"])
    assert list(captured) == [("fc1",), ("head",)]
    np.testing.assert_array_equal(captured[("fc1",)], x)
    np.testing.assert_allclose(captured[("head",)], hidden, rtol=1e-6, atol=1e-6)
    assert [c.features_in for c in dense_calls(model, variables, x)] == [3, 4]
    net = _KeywordNnx(nnx.Rngs(0))
    captured = capture_linear_inputs(net, x)
    assert list(captured) == [("fc1",), ("head",)]
    np.testing.assert_array_equal(captured[("fc1",)], x)
    np.testing.assert_allclose(captured[("head",)], nnx.relu(net.fc1(x)), rtol=1e-6, atol=1e-6)


_nnx_jitted = nnx.jit(lambda net, x: net(x))


class _Jitted(nnx.Module):
    """A forward compiled inside the model: by ``nnx.jit`` (which calls copies of the
    layers) or by ``jax.jit`` closing over them (which calls the layers themselves)."""

    def __init__(self, net: nnx.Module, nnx_jit: bool) -> None:
        self.net, self.nnx_jit = net, nnx_jit

    def __call__(self, x: jax.Array) -> jax.Array:
        return _nnx_jitted(self.net, x) if self.nnx_jit else jax.jit(self.net)(x)


def test_nnx_capture_refuses_a_jitted_forward():
    net = _KeywordNnx(nnx.Rngs(0))
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="net/fc1 is called inside a transform.*un-jitted"):
        capture_linear_inputs(_Jitted(net, nnx_jit=False), x)  # it would leak a tracer
    assert nnx.Linear.__call__.__name__ == "__call__"
    for _ in range(2):  # traced (on copies of the layers), then cached: no call captured
        with pytest.raises(ValueError, match="called no nnx.Linear.*un-jitted"):
            capture_linear_inputs(_Jitted(net, nnx_jit=True), x)
    with pytest.raises(ValueError, match="called no nnx.Linear.*un-jitted"):
        capture_linear_inputs(_Jitted(net, nnx_jit=True), x, layers=[("net", "head")])
    # jitting the whole capture is fine: the forward runs in the capture's own trace
    jitted = nnx.jit(lambda model, x: capture_linear_inputs(model, x))(net, x)
    np.testing.assert_array_equal(jitted[("fc1",)], x)


def test_hessian_summed_over_batches_is_the_one_shot_hessian(gpt, pruned_2_4):
    model, params, tokens = gpt
    one = pruned_2_4("sparsegpt")
    split = prune_sequential(model, params, tokens, "sparsegpt", "2:4", batch_size=3)
    x = capture_dense_inputs(model, {"params": params}, tokens)[("block1", "attn", "query")]
    summed = input_hessian(x[:3 * CONTEXT]) + input_hessian(x[3 * CONTEXT:])
    np.testing.assert_allclose(summed, input_hessian(x), rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(one[0]), jax.tree.leaves(split[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
    assert [r.name for r in one[1]] == ORDER


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_driver_equals_layer_by_layer_by_hand_with_recomputed_inputs(gpt, pruned_2_4, method):
    model, params, tokens = gpt
    pruned, report = pruned_2_4(method)
    # by hand: recapture every layer's input from the params pruned so far
    current = jax.tree.map(lambda a: a, params)
    stale = capture_dense_inputs(model, {"params": params}, tokens)  # the dense model's
    differs = False
    for name in ORDER:
        path = tuple(name.split("/"))
        x = capture_dense_inputs(model, {"params": current}, tokens, layers=[path])[path]
        node = current
        for key in path:
            node = node[key]
        node["kernel"] = prune_layer(method, node["kernel"], x, "2:4").kernel
        differs |= not np.allclose(x, stale[path])
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(current), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert differs  # later layers did see the pruned layers' outputs
    for name in ORDER:  # every N:M group of every pruned kernel keeps exactly N
        node = pruned
        for key in name.split("/"):
            node = node[key]
        assert np.all(np.asarray(nm_groups(node["kernel"] != 0, "2:4").sum(axis=1)) == 2)
    assert [r.density for r in report] == [0.5] * 7
    assert all(0 < r.reconstruction_error < 1 for r in report)
    # embeddings and norms untouched
    np.testing.assert_array_equal(pruned["token_embed"]["embedding"],
                                  params["token_embed"]["embedding"])


def test_driver_refuses_conv_kernels_and_bad_requests(gpt):
    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3,), name="conv")(x)
            return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))

    net = ConvNet()
    x = jnp.ones((2, 8, 1))
    params = net.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="conv/kernel is prunable but is not the kernel of an"
                                         " nn.Dense.*not supported yet"):
        prune_sequential(net, params, x, "wanda", "unstructured", 0.5)
    model, params, tokens = gpt
    with pytest.raises(ValueError, match="block1/attn/query/kernel: .*not divisible by 128"):
        prune_sequential(model, params, tokens, "wanda", "64:128")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        prune_sequential(model, params, tokens, "wanda", "2:4", batch_size=0)
