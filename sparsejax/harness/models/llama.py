"""A small LLaMA-style decoder in Flax NNX: RMSNorm, rotary position embeddings (RoPE),
a SwiGLU MLP and grouped-query attention, pre-norm residual blocks, an untied head.

The layout and names are those of Hugging Face's ``LlamaForCausalLM`` (``embed_tokens``,
``layers/{i}/{input_layernorm, self_attn/{q,k,v,o}_proj, post_attention_layernorm,
mlp/{gate,up,down}_proj}``, ``norm``, ``lm_head`` there, ``head`` here, the name every
model of the zoo gives its classifier), without biases by default. Every projection is a 2-D
``nnx.Linear`` kernel ``(in, out)``, so the masks of training methods and the
post-training pruners reach it as they reach a linen ``Dense``; the blocks are the list
``layers``, named ``"layers/0"``, ``"layers/1"``, ... by
:func:`sparsejax.posttrain.prune_blocks`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.harness.data import DEFAULT_CONTEXT

__all__ = ["Llama", "DecoderLayer", "Attention", "SwiGLU", "rope", "swiglu_hidden",
           "check_heads"]

embedding_init = nnx.initializers.normal(stddev=0.02)


def swiglu_hidden(n_embd: int, multiple_of: int = 32) -> int:
    """LLaMA's MLP width: ``8/3 n_embd`` (the parameters of a ``4 n_embd`` GELU MLP in
    three matrices), rounded up to a multiple of ``multiple_of`` (256 in LLaMA; 32 here,
    for small widths: 128 gives 352, a multiple of 4 and 8 for N:M patterns).

    >>> swiglu_hidden(128), swiglu_hidden(4096, 256)
    (352, 11008)
    """
    hidden = int(2 * 4 * n_embd / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of ``x`` ``(batch, time, heads, head_dim)`` at
    ``positions`` ``(time,)``, in LLaMA's rotate-half form: feature ``i`` and ``i +
    head_dim/2`` are rotated by the angle ``position * base^(-2i/head_dim)``. A rotation by
    ``m`` then one by ``n`` give dot products that depend on ``m - n`` only.

    >>> import jax.numpy as jnp
    >>> q, k = jnp.ones((1, 1, 1, 4)), jnp.arange(4.0).reshape(1, 1, 1, 4)
    >>> dot = lambda m, n: float((rope(q, jnp.array([m])) * rope(k, jnp.array([n]))).sum())
    >>> round(dot(5, 2), 4) == round(dot(13, 10), 4)
    True
    """
    half = x.shape[-1] // 2
    inverse = base ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
    angles = positions.astype(jnp.float32)[:, None] * inverse[None, :]  # (time, half)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def check_heads(n_embd: int, n_head: int, n_kv_head: int) -> None:
    """``ValueError`` unless ``n_embd`` splits into ``n_head`` heads of an even width and
    ``n_head`` is a multiple of ``n_kv_head``."""
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise ValueError(f"n_embd={n_embd} must split into n_head={n_head} heads of an "
                         "even width (RoPE rotates pairs of features)")
    if n_head % n_kv_head:
        raise ValueError(f"n_head={n_head} is not a multiple of n_kv_head={n_kv_head}")


class Attention(nnx.Module):
    """Causal grouped-query attention: ``n_head`` query heads, ``n_kv_head`` key/value
    heads, each shared by ``n_head // n_kv_head`` consecutive query heads (query head
    ``h`` reads key/value head ``h // group``, as LLaMA's ``repeat_kv``); RoPE on queries
    and keys. Projections ``q_proj`` ``(d, n_head hd)``, ``k_proj`` and ``v_proj`` ``(d,
    n_kv_head hd)``, ``o_proj`` ``(n_head hd, d)``."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, use_bias: bool = False, *,
                 rngs: nnx.Rngs):
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        inner, kv = n_head * self.head_dim, n_kv_head * self.head_dim
        self.q_proj = nnx.Linear(n_embd, inner, use_bias=use_bias, rngs=rngs)
        self.k_proj = nnx.Linear(n_embd, kv, use_bias=use_bias, rngs=rngs)
        self.v_proj = nnx.Linear(n_embd, kv, use_bias=use_bias, rngs=rngs)
        self.o_proj = nnx.Linear(inner, n_embd, use_bias=use_bias, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        batch, time, _ = x.shape
        group = self.n_head // self.n_kv_head
        q = rope(self.q_proj(x).reshape(batch, time, self.n_head, self.head_dim), positions)
        k = rope(self.k_proj(x).reshape(batch, time, self.n_kv_head, self.head_dim), positions)
        v = self.v_proj(x).reshape(batch, time, self.n_kv_head, self.head_dim)
        q = q.reshape(batch, time, self.n_kv_head, group, self.head_dim)  # h = kv * group + g
        logits = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(self.head_dim)
        allowed = jnp.tril(jnp.ones((time, time), bool))
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
        return self.o_proj(out.reshape(batch, time, self.n_head * self.head_dim))


class SwiGLU(nnx.Module):
    """LLaMA's gated MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, n_embd: int, hidden: int, use_bias: bool = False, *, rngs: nnx.Rngs):
        self.gate_proj = nnx.Linear(n_embd, hidden, use_bias=use_bias, rngs=rngs)
        self.up_proj = nnx.Linear(n_embd, hidden, use_bias=use_bias, rngs=rngs)
        self.down_proj = nnx.Linear(hidden, n_embd, use_bias=use_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """A pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``x +
    mlp(post_attention_layernorm(x))``; called as ``x = layer(x, positions)``."""

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, hidden: int,
                 use_bias: bool = False, *, rngs: nnx.Rngs):
        self.input_layernorm = nnx.RMSNorm(n_embd, epsilon=1e-5, rngs=rngs)
        self.self_attn = Attention(n_embd, n_head, n_kv_head, use_bias, rngs=rngs)
        self.post_attention_layernorm = nnx.RMSNorm(n_embd, epsilon=1e-5, rngs=rngs)
        self.mlp = SwiGLU(n_embd, hidden, use_bias, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
    """A LLaMA-style causal language model over token ids.

    Takes token ids ``(batch, time)`` (any numeric dtype, cast to ``int32``; ``time <=
    context``) and returns next-token logits ``(batch, time, num_classes)``, where
    ``num_classes`` is the vocabulary size. ``embed_tokens`` (``(vocab, n_embd)``, leaf
    ``embedding``), ``n_layer`` :class:`DecoderLayer` blocks in the list ``layers``, a
    final RMSNorm ``norm`` and the untied ``head`` ``(n_embd, vocab)``. Positions enter
    through RoPE only (no position table): ``positions`` (default ``0..time-1``) shifted
    by a constant give the same logits. ``context`` bounds the sequence length and sets
    the windows a text dataset is cut into. ``use_bias`` (default ``False``, as LLaMA)
    gives every projection and the head a bias.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = Llama(65, n_layer=1, n_embd=32, n_head=4, n_kv_head=2, context=16,
    ...               rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8), jnp.int32)).shape, model.layers[0].mlp.up_proj.kernel.shape
    ((2, 8, 65), (32, 96))
    """

    def __init__(self, num_classes: int, n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
                 n_kv_head: int = 2, context: int = DEFAULT_CONTEXT,
                 mlp_hidden: int | None = None, use_bias: bool = False, *, rngs: nnx.Rngs):
        check_heads(n_embd, n_head, n_kv_head)
        self.context = context
        hidden = swiglu_hidden(n_embd) if mlp_hidden is None else mlp_hidden
        self.embed_tokens = nnx.Embed(num_classes, n_embd, embedding_init=embedding_init,
                                      rngs=rngs)
        self.layers = nnx.List([DecoderLayer(n_embd, n_head, n_kv_head, hidden, use_bias,
                                             rngs=rngs) for _ in range(n_layer)])
        self.norm = nnx.RMSNorm(n_embd, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(n_embd, num_classes, use_bias=use_bias, rngs=rngs)

    def block_paths(self) -> list[str]:
        """The blocks as :func:`sparsejax.posttrain.prune_blocks` names them."""
        return [f"layers/{i}" for i in range(len(self.layers))]

    def __call__(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        if x.ndim != 2:
            raise ValueError(f"llama takes token ids of shape (batch, time), got shape {x.shape}")
        time = x.shape[1]
        if time > self.context:
            raise ValueError(f"llama got {time} tokens per sequence, more than its "
                             f"context={self.context}")
        positions = jnp.arange(time) if positions is None else positions
        h = self.embed_tokens(x.astype(jnp.int32))  # init_model feeds float zeros
        for layer in self.layers:
            h = layer(h, positions)
        return self.head(self.norm(h))
