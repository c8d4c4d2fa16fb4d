"""A small Vision Transformer whose every projection is an ordinary, maskable ``Dense``."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.harness.models._layers import as_float, check_images

xavier_uniform = nn.initializers.xavier_uniform()
embedding_init = nn.initializers.normal(stddev=0.02)
POOLS: tuple[str, ...] = ("cls", "mean")


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``query``, ``key``, ``value``, ``out`` Dense
    layers, each with a 2-D ``(dim, dim)`` kernel (no 3-D ``DenseGeneral`` kernels).
    ``causal``: position ``t`` attends to positions ``<= t`` only (a language model)."""

    num_heads: int
    use_bias: bool = True
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        if dim % self.num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads={self.num_heads}")
        head_dim = dim // self.num_heads

        def project(name: str, y: jax.Array) -> jax.Array:
            return nn.Dense(dim, use_bias=self.use_bias, kernel_init=xavier_uniform, name=name)(y)

        def split(y: jax.Array) -> jax.Array:
            return y.reshape(batch, tokens, self.num_heads, head_dim)

        q = split(project("query", x))
        k = split(project("key", x))
        v = split(project("value", x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        if self.causal:
            allowed = jnp.tril(jnp.ones((tokens, tokens), bool))
            logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim)
        return project("out", out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    num_heads: int
    mlp_dim: int
    use_bias: bool = True
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = x + SelfAttention(self.num_heads, self.use_bias, self.causal, name="attn")(
            nn.LayerNorm(name="norm1")(x)
        )
        y = nn.LayerNorm(name="norm2")(x)
        y = nn.Dense(self.mlp_dim, use_bias=self.use_bias, kernel_init=xavier_uniform, name="fc1")(
            y
        )
        y = nn.gelu(y)
        y = nn.Dense(dim, use_bias=self.use_bias, kernel_init=xavier_uniform, name="fc2")(y)
        return x + y


class ViT(nn.Module):
    """A small Vision Transformer for 28x28 / 32x32 images.

    Non-overlapping ``patch_size`` patches embedded by a strided Conv (``patch_embed``, kernel
    ``(p, p, C, D)``), a learned class token (``cls_token``, shape ``(1, 1, D)``; only with
    ``pool='cls'``) and position embedding (``pos_embedding``, ``(1, tokens, D)``), ``depth``
    pre-norm blocks (``block{i}``, each with ``norm1``, ``attn/{query,key,value,out}``,
    ``norm2``, ``fc1``, ``fc2``), a final LayerNorm ``norm`` and the ``head``. No dropout.

    >>> import jax, jax.numpy as jnp
    >>> model = ViT(num_classes=10, embed_dim=32, depth=1, num_heads=2)
    >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    >>> jax.jit(model.apply)(variables, jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
    """

    num_classes: int
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    pool: str = "cls"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no batch norm
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        x = as_float(x)
        check_images(x, "vit")
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(
                f"image size {x.shape[1:3]} is not divisible by patch_size={self.patch_size}"
            )
        dim = self.embed_dim
        x = nn.Conv(
            dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=self.use_bias,
            kernel_init=xavier_uniform,
            name="patch_embed",
        )(x)
        batch = x.shape[0]
        x = x.reshape(batch, -1, dim)
        if self.pool == "cls":
            cls = self.param("cls_token", embedding_init, (1, 1, dim), x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, dim)), x], axis=1)
        pos = self.param("pos_embedding", embedding_init, (1, x.shape[1], dim), x.dtype)
        x = x + pos
        mlp_dim = max(1, int(round(dim * self.mlp_ratio)))
        for i in range(1, self.depth + 1):
            x = EncoderBlock(self.num_heads, mlp_dim, self.use_bias, name=f"block{i}")(x)
        x = nn.LayerNorm(name="norm")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        return nn.Dense(
            self.num_classes, use_bias=self.use_bias, kernel_init=xavier_uniform, name="head"
        )(x)
