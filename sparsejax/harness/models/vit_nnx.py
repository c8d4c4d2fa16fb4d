"""A small Vision Transformer in Flax NNX, for :func:`sparsejax.nnx.sparsify` (the drop-in
form of the score methods) and, registered as ``vit_nnx``, for the training harness.

Every weight matrix is a plain 2-D ``nnx.Linear`` kernel ``(in, out)``: the patch
embedding (``patch_embed``, ``(p * p * C, D)`` over flattened non-overlapping patches, the
same map as a strided ``p x p`` convolution), the attention projections
``blocks/{i}/attn/{query,key,value,out}``, the MLP ``blocks/{i}/{fc1,fc2}`` and the
classifier ``head``; so Edge-Popup, biprop and the gates mask all of them. The learned
position table ``pos_embed/embedding`` ``(tokens, D)`` and the LayerNorms' ``scale`` and
``bias`` are not kernels: the default filter leaves them dense (a strong ticket keeps them
frozen at their init, ones and zeros for the norms). Pooling is the mean over tokens (no
class token), no dropout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.harness.models._layers import as_float, check_images

__all__ = ["ViTNNX", "Attention", "Block", "patchify"]

xavier_uniform = nnx.initializers.xavier_uniform()
embedding_init = nnx.initializers.normal(stddev=0.02)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """``(batch, H, W, C)`` images as ``(batch, tokens, p * p * C)`` non-overlapping patches,
    row by row (the order of a strided convolution's outputs).

    >>> import jax.numpy as jnp
    >>> patchify(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, 1].tolist()
    [2.0, 3.0, 6.0, 7.0]
    """
    batch, height, width, channels = x.shape
    p = patch_size
    x = x.reshape(batch, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def _linear(features_in: int, features_out: int, use_bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(features_in, features_out, use_bias=use_bias, kernel_init=xavier_uniform,
                      rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with separate ``query``, ``key``, ``value``, ``out``
    ``(D, D)`` projections."""

    def __init__(self, dim: int, num_heads: int, use_bias: bool, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.query = _linear(dim, dim, use_bias, rngs)
        self.key = _linear(dim, dim, use_bias, rngs)
        self.value = _linear(dim, dim, use_bias, rngs)
        self.out = _linear(dim, dim, use_bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads

        def split(y: jax.Array) -> jax.Array:
            return y.reshape(batch, tokens, self.num_heads, head_dim)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits, axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim))


class Block(nnx.Module):
    """Pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, use_bias: bool, *,
                 rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = Attention(dim, num_heads, use_bias, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = _linear(dim, mlp_dim, use_bias, rngs)
        self.fc2 = _linear(mlp_dim, dim, use_bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class ViTNNX(nnx.Module):
    """A small ViT over ``(batch, image_size, image_size, channels)`` images.

    ``patch_size`` must divide ``image_size``; ``tokens = (image_size / patch_size) ** 2``.
    The defaults take 32x32 RGB images (CIFAR); MNIST is ``image_size=28, channels=1``
    (``patch_size=7``: 16 tokens, or 4: 49 tokens). Submodules: ``patch_embed``,
    ``pos_embed`` (``nnx.Embed``, leaf ``embedding``), ``blocks`` (a list of
    :class:`Block`), the final LayerNorm ``norm``, ``head``. ``use_bias=False`` leaves
    biases only in the LayerNorms (the strong-ticket setting).

    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: ViTNNX(10, image_size=28, channels=1, patch_size=7,
    ...                                       embed_dim=16, depth=1, rngs=nnx.Rngs(0)))
    >>> model.patch_embed.kernel.shape, model.pos_embed.embedding.shape, len(model.blocks)
    ((49, 16), (16, 16), 1)
    """

    def __init__(self, num_classes: int, image_size: int = 32, channels: int = 3,
                 patch_size: int = 4, embed_dim: int = 64, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 2.0, use_bias: bool = True, *, rngs: nnx.Rngs):
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by "
                             f"patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        tokens = (image_size // patch_size) ** 2
        mlp_dim = max(1, int(round(embed_dim * mlp_ratio)))
        self.patch_embed = _linear(patch_size * patch_size * channels, embed_dim, use_bias, rngs)
        self.pos_embed = nnx.Embed(tokens, embed_dim, embedding_init=embedding_init, rngs=rngs)
        self.blocks = nnx.List([Block(embed_dim, num_heads, mlp_dim, use_bias, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(embed_dim, rngs=rngs)
        self.head = _linear(embed_dim, num_classes, use_bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = as_float(x)
        check_images(x, "vit_nnx")
        expected = (self.image_size, self.image_size, self.channels)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"vit_nnx was built for images of shape {expected} "
                             f"(options image_size, channels), got {tuple(x.shape[1:])}")
        h = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed.embedding[...]
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(self.norm(h), axis=1))
