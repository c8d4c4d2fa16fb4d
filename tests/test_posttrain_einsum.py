"""Einsum projections in post-training pruning (issue #30): an einsum kernel pruned as the
matrix (contracted input axes, output axes) gives the very weights of the equivalent Dense
layer; a user-written NNX decoder with einsum attention pruned by prune_blocks; the
einsums and conv layers refused by name."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.posttrain.blocks import prune_blocks
from sparsejax.posttrain.capture import capture_linear_inputs
from sparsejax.posttrain.kernels import KernelLayout
from sparsejax.posttrain.sequential import prune_sequential

B, T, H, K = 3, 8, 2, 4
D = H * K  # 8
PATTERNS = [("unstructured", 0.5), ("2:4", None)]
METHODS = ["magnitude", "wanda", "sparsegpt"]


class _EinsumBlock(nnx.Module):
    """Four einsum layers on exact reshapes and transposes of the block's input: the
    contracted axes leading in the kernel (q1), two of them (o2), not leading in the
    kernel (q3), not trailing in the input (o4)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.q1 = nnx.Einsum("btd,dhk->bthk", (D, H, K), rngs=rngs)
        self.o2 = nnx.Einsum("bthk,hkd->btd", (H, K, D), rngs=rngs)
        self.q3 = nnx.Einsum("btd,hdk->bthk", (H, D, K), rngs=rngs)
        self.o4 = nnx.Einsum("bhtk,hkd->btd", (H, K, D), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        heads = x.reshape(B, T, H, K)
        return (self.q1(x).reshape(B, T, D) + self.o2(heads) + self.q3(x).reshape(B, T, D)
                + self.o4(heads.transpose(0, 2, 1, 3)))


class _DenseBlock(nnx.Module):
    """The same maps as nnx.Linear layers on the inputs flattened by hand."""

    def __init__(self, block: _EinsumBlock, rngs: nnx.Rngs) -> None:
        kernels = {"q1": block.q1.kernel[...].reshape(D, H * K),
                   "o2": block.o2.kernel[...].reshape(H * K, D),
                   "q3": block.q3.kernel[...].transpose(1, 0, 2).reshape(D, H * K),
                   "o4": block.o4.kernel[...].reshape(H * K, D)}
        for name, kernel in kernels.items():
            layer = nnx.Linear(*kernel.shape, use_bias=False, rngs=rngs)
            layer.kernel[...] = kernel
            setattr(self, name, layer)

    def __call__(self, x: jax.Array) -> jax.Array:
        flat = x.reshape(B, T, H * K)  # o4's input transposed back: the same rows
        return self.q1(x) + self.o2(flat) + self.q3(x) + self.o4(flat)  # flat is x (D = H*K)


class _One(nnx.Module):
    def __init__(self, block: nnx.Module) -> None:
        self.block = block

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block(x)


def _as_matrices(block: _EinsumBlock) -> dict[str, np.ndarray]:
    """The einsum kernels as the Dense kernels (by hand, as _DenseBlock builds them)."""
    return {"q1": np.asarray(block.q1.kernel[...]).reshape(D, H * K),
            "o2": np.asarray(block.o2.kernel[...]).reshape(H * K, D),
            "q3": np.asarray(block.q3.kernel[...]).transpose(1, 0, 2).reshape(D, H * K),
            "o4": np.asarray(block.o4.kernel[...]).reshape(H * K, D)}


@pytest.fixture(scope="module")
def pair():
    einsum = _One(_EinsumBlock(nnx.Rngs(0)))
    dense = _One(_DenseBlock(einsum.block, nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (B, T, D))
    return einsum, dense, x


@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_einsum_kernel_prunes_as_the_equivalent_dense_kernel(pair, method, pattern, sparsity):
    einsum, dense, x = pair
    pruned_e, report_e = prune_blocks(einsum, None, x, method, pattern, sparsity,
                                      blocks=["block"])
    pruned_d, report_d = prune_blocks(dense, None, x, method, pattern, sparsity,
                                      blocks=["block"])
    # the einsum block's q1 and q3 share one input (x), o2 and o4 another (the heads)
    assert [r.name for r in report_e] == ["block/q1", "block/q3", "block/o2", "block/o4"]
    dense_report = {r.name: r for r in report_d}  # one input for all four: call order
    got = _as_matrices(pruned_e.block)
    for name, matrix in got.items():
        expected = np.asarray(getattr(pruned_d.block, name).kernel[...])
        np.testing.assert_array_equal(matrix, expected, err_msg=name)
    np.testing.assert_array_equal([r.density for r in report_e], [0.5] * 4)
    np.testing.assert_allclose([r.reconstruction_error for r in report_e],
                               [dense_report[r.name].reconstruction_error for r in report_e],
                               rtol=1e-6)


def test_linen_einsum_prunes_as_the_equivalent_dense_kernel():
    class Heads(nn.Module):
        dense: bool

        @nn.compact
        def __call__(self, x):  # the output projection of attention heads
            if self.dense:
                return nn.Dense(D, use_bias=False, name="out")(x.reshape(B, T, H * K))
            return nn.Einsum((H, K, D), "bthk,hkd->btd", use_bias=False, name="out")(x)

    class Net(nn.Module):
        dense: bool

        @nn.compact
        def __call__(self, x):
            return Heads(self.dense, name="block")(x)

    x = jax.random.normal(jax.random.key(3), (B, T, H, K))
    params = Net(False).init(jax.random.key(0), x)["params"]
    dense = {"block": {"out": {"kernel": params["block"]["out"]["kernel"].reshape(H * K, D)}}}
    pruned_e, _ = prune_blocks(Net(False), params, x, "sparsegpt", "2:4", blocks=["block"])
    pruned_d, _ = prune_blocks(Net(True), dense, x, "sparsegpt", "2:4", blocks=["block"])
    np.testing.assert_array_equal(pruned_e["block"]["out"]["kernel"].reshape(H * K, D),
                                  pruned_d["block"]["out"]["kernel"])
    # prune_sequential takes the same path
    sequential, report = prune_sequential(Net(False), params, x, "sparsegpt", "2:4")
    assert [r.name for r in report] == ["block/out"]
    np.testing.assert_array_equal(sequential["block"]["out"]["kernel"],
                                  pruned_e["block"]["out"]["kernel"])


# a decoder written by a user with NNX modules alone: no sparsejax model class

class _Attention(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs) -> None:
        k = d // heads
        self.q = nnx.Einsum("btd,dhk->bthk", (d, heads, k), rngs=rngs)
        self.k = nnx.Einsum("btd,dhk->bthk", (d, heads, k), rngs=rngs)
        self.v = nnx.Einsum("btd,dhk->bthk", (d, heads, k), rngs=rngs)
        self.o = nnx.Einsum("bthk,hkd->btd", (heads, k, d), (d,), rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        return self.o(jnp.einsum("bhts,bshk->bthk", weights, v))


class _DecoderBlock(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs) -> None:
        self.norm1, self.norm2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = _Attention(d, heads, rngs)
        self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class _Decoder(nnx.Module):
    def __init__(self, vocab: int, d: int, heads: int, depth: int, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([_DecoderBlock(d, heads, rngs) for _ in range(depth)])
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        mask = jnp.tril(jnp.ones((tokens.shape[1], tokens.shape[1]), bool))
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)


# the kernels of one block as matrices (in, out), by hand: 2:4 groups run along axis 0
_MATRICES = {"attn/q": lambda w: w.reshape(w.shape[0], -1),
             "attn/k": lambda w: w.reshape(w.shape[0], -1),
             "attn/v": lambda w: w.reshape(w.shape[0], -1),
             "attn/o": lambda w: w.reshape(-1, w.shape[-1]),
             "up": lambda w: w, "down": lambda w: w}


def _kernel(model: _Decoder, block: int, name: str) -> np.ndarray:
    module = model.blocks[block]
    for key in name.split("/"):
        module = getattr(module, key)
    return np.asarray(module.kernel[...])


@pytest.mark.parametrize("method,pattern,sparsity,within", [
    ("wanda", "unstructured", 0.5, "block_inputs"), ("wanda", "2:4", None, "block_inputs"),
    ("sparsegpt", "unstructured", 0.5, "block_inputs"), ("sparsegpt", "2:4", None, "block_inputs"),
    ("sparsegpt", "2:4", None, "sequential")])
def test_user_written_nnx_decoder_with_einsum_attention(method, pattern, sparsity, within):
    vocab, depth = 13, 2
    model = _Decoder(vocab, 16, 2, depth, nnx.Rngs(0))
    before = _params(model)
    tokens = jax.random.randint(jax.random.key(1), (4, T), 0, vocab)
    pruned, report = prune_blocks(model, None, tokens, method, pattern, sparsity,
                                  blocks=[f"blocks/{i}" for i in range(depth)], within=within)
    assert [r.name for r in report] == [f"blocks/{i}/{n}" for i in range(depth)
                                        for n in ["attn/q", "attn/k", "attn/v", "attn/o",
                                                  "up", "down"]]
    for i in range(depth):
        for name, as_matrix in _MATRICES.items():
            kernel = _kernel(pruned, i, name)
            assert kernel.shape == _kernel(model, i, name).shape
            matrix = as_matrix(kernel)
            assert int(np.sum(kernel == 0)) == kernel.size // 2, (i, name)
            if pattern == "2:4":  # groups of 4 consecutive input features (contracted axes)
                groups = (matrix != 0).reshape(matrix.shape[0] // 4, 4, matrix.shape[1])
                np.testing.assert_array_equal(groups.sum(axis=1), 2, err_msg=f"{i}/{name}")
    after = _params(pruned)
    assert after.keys() == before.keys()
    kept = [name for name in before if "kernel" not in name or "head" in name]
    assert "['head']['kernel']" in "".join(kept) and "['embed']" in "".join(kept)
    for name in kept:  # the head, the embeddings, the norms and the biases stay dense
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    # the user's model is unchanged, and the pruned one runs
    for name, leaf in _params(model).items():
        np.testing.assert_array_equal(leaf, before[name], err_msg=name)
    assert np.isfinite(pruned(tokens)).all()


def _params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


# refusals

class _Wrapper(nnx.Module):
    def __init__(self, block: nnx.Module) -> None:
        self.block = block

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block(x)


class _PerHead(nnx.Module):
    """One matrix per head: the kernel's head axis is a batch axis of the output."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.proj = nnx.Einsum("bhtd,hdk->bhtk", (H, K, K), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class _ConvBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(K, K, (3,), rngs=rngs)
        self.fc = nnx.Linear(K, K, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.conv(x))


def test_unsupported_einsum_is_refused_by_name_or_kept_dense():
    model = _Wrapper(_PerHead(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (B, H, T, K))
    with pytest.raises(ValueError, match="block/proj/kernel is prunable but .*block/proj einsum "
                                         "'bhtd,hdk->bhtk' keeps kernel axis 'h' in the output"):
        prune_blocks(model, None, x, "wanda", "2:4", blocks=["block"])
    with pytest.raises(ValueError, match="block/proj: einsum 'bhtd,hdk->bhtk' keeps kernel axis"):
        capture_linear_inputs(model, x, layers=[("block", "proj")])
    pruned, report = prune_blocks(model, None, x, "wanda", "2:4", blocks=["block"],
                                  prunable=lambda name, leaf: False)
    assert report == []
    np.testing.assert_array_equal(pruned.block.proj.kernel[...], model.block.proj.kernel[...])


def test_conv_layers_are_refused_by_name():
    x = jax.random.normal(jax.random.key(1), (B, T, K))
    with pytest.raises(ValueError, match="block/conv/kernel is prunable but .*block/conv is a "
                                         "nnx.Conv \\(a conv kernel\\).*not supported"):
        prune_blocks(_Wrapper(_ConvBlock(nnx.Rngs(0))), None, x, "sparsegpt", "2:4",
                     blocks=["block"])

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(K, name="fc")(nn.Conv(K, (3,), name="conv")(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Conv(name="block")(x)

    params = Net().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="block/conv/kernel is prunable but .*block/conv is a "
                                         "nn.Conv \\(a conv kernel\\)"):
        prune_blocks(Net(), params, x, "wanda", "2:4", blocks=["block"])
    # the Dense layer alone, the conv kept dense
    pruned, report = prune_blocks(Net(), params, x, "wanda", "2:4", blocks=["block"],
                                  prunable=lambda name, leaf: name == "block/fc/kernel")
    assert [r.name for r in report] == ["block/fc"]
    np.testing.assert_array_equal(pruned["block"]["conv"]["kernel"],
                                  params["block"]["conv"]["kernel"])


@pytest.mark.parametrize("equation,reason", [
    ("bhtd,hdk->bhtk", "keeps kernel axis 'h' in the output"),
    ("btd,dkz->btk", "sums kernel axis 'z' alone"),
    ("btdz,dk->btk", "sums input axis 'z' away"),
    ("btd,...dk->btk", "ellipsis in the kernel"),
    ("...d,dk->k", "sums away the axes of the input's ellipsis"),
    ("btdd,dk->btk", "repeats an axis letter"),
    ("btd,hk->btdhk", "contracts no axis"),
    ("btd->btd", "two-operand"),
])
def test_einsum_forms_refused(equation, reason):
    layout = KernelLayout.einsum(equation)
    assert reason in layout.refused
    with pytest.raises(ValueError, match=f"^layer/x: einsum .*{reason}"):
        layout.check("layer/x")


def test_einsum_geometry_with_an_ellipsis_input():
    layout = KernelLayout.einsum("...hk,hkd->...d")
    assert layout.refused is None
    x = jax.random.normal(jax.random.key(0), (2, 3, H, K))
    assert layout.inputs(x).shape == (6, H * K)
    np.testing.assert_array_equal(layout.inputs(x), x.reshape(6, H * K))
    assert layout.matrix_shape((H, K, D)) == (H * K, D)
