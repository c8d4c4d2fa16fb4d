"""A small GPT: a decoder-only (causal) transformer language model over token ids.

The blocks are the ViT's pre-norm :class:`~sparsejax.harness.models.vit.EncoderBlock` with causal
attention, so every projection is an ordinary, maskable 2-D ``Dense`` kernel.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.harness.data import DEFAULT_CONTEXT
from sparsejax.harness.models.vit import EncoderBlock, embedding_init, xavier_uniform


class GPT(nn.Module):
    """A GPT (Radford et al. 2018; nanoGPT's layout, without dropout and weight tying).

    Takes token ids ``(batch, time)`` (any numeric dtype, cast to ``int32``; ``time <=
    context``) and returns next-token logits ``(batch, time, num_classes)``, where
    ``num_classes`` is the vocabulary size. Layers: token embedding ``token_embed``
    (``nn.Embed``, leaf ``embedding`` ``(vocab, n_embd)``), learned position embedding
    ``pos_embed`` (``(context, n_embd)``), ``n_layer`` pre-LayerNorm blocks ``block{i}``
    (``norm1``, causal ``attn/{query,key,value,out}``, ``norm2``, ``fc1`` to ``4 n_embd``
    with GELU, ``fc2``), a final LayerNorm ``norm`` and the Dense ``head`` ``(n_embd,
    vocab)``. The library's default prunable filter prunes every Dense kernel (attention,
    MLP and head); embeddings (leaf ``embedding``), LayerNorm scales and biases stay dense.

    >>> import jax, jax.numpy as jnp
    >>> model = GPT(num_classes=65, n_layer=1, n_embd=32, n_head=2, context=16)
    >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    >>> jax.jit(model.apply)(variables, jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 65)
    """

    num_classes: int
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    context: int = DEFAULT_CONTEXT  # the windows a text dataset is cut into by default
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no batch norm
        if x.ndim != 2:
            raise ValueError(f"gpt takes token ids of shape (batch, time), got shape {x.shape}")
        time = x.shape[1]
        if time > self.context:
            raise ValueError(f"gpt got {time} tokens per sequence, more than its "
                             f"context={self.context}")
        tokens = x.astype(jnp.int32)  # init_model feeds float zeros
        h = nn.Embed(self.num_classes, self.n_embd, embedding_init=embedding_init,
                     name="token_embed")(tokens)
        h = h + nn.Embed(self.context, self.n_embd, embedding_init=embedding_init,
                         name="pos_embed")(jnp.arange(time))
        for i in range(1, self.n_layer + 1):
            h = EncoderBlock(self.n_head, 4 * self.n_embd, self.use_bias, causal=True,
                             name=f"block{i}")(h)
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=xavier_uniform,
                        name="head")(h)
