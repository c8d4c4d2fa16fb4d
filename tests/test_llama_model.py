"""The LLaMA-style NNX decoder of the model zoo (issue #30): shapes and names, causality,
grouped-query attention, RoPE's relative positions, the harness's NNX adapter, and a few
training steps through ``sparsejax train``'s loop on a generated text."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.core.masks import default_prunable, prunable_leaves
from sparsejax.harness.models import (
    TEXT_MODELS,
    NNXModel,
    apply_model,
    check_model_dataset,
    get_model,
    init_model,
)
from sparsejax.harness.models.llama import Llama, rope, swiglu_hidden
from sparsejax.harness.training.loop import TrainConfig, train
from sparsejax.posttrain.capture import capture_linear_inputs

VOCAB, CONTEXT = 11, 8
TINY = dict(n_layer=2, n_embd=16, n_head=4, n_kv_head=2, context=CONTEXT)
HEAD_DIM = 4


@pytest.fixture(scope="module")
def tiny():
    """(model, params) of a 2-layer llama, 16 wide, 4 query and 2 key/value heads."""
    model = get_model("llama", VOCAB, **TINY)
    params, state = init_model(model, jax.random.key(0), (1, CONTEXT))
    assert state == {}
    return model, params


def tokens(seed: int = 1, batch: int = 2) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, CONTEXT), 0, VOCAB)


def test_shapes_names_and_prunable_kernels(tiny):
    model, params = tiny
    assert isinstance(model, NNXModel) and "llama" in TEXT_MODELS
    logits, _ = apply_model(model, params, {}, tokens(), train=False)
    assert logits.shape == (2, CONTEXT, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
    shapes = {"/".join(str(k.key) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    hidden = swiglu_hidden(16)
    layer = {"input_layernorm/scale": (16,), "post_attention_layernorm/scale": (16,),
             "self_attn/q_proj/kernel": (16, 16), "self_attn/k_proj/kernel": (16, 8),
             "self_attn/v_proj/kernel": (16, 8), "self_attn/o_proj/kernel": (16, 16),
             "mlp/gate_proj/kernel": (16, hidden), "mlp/up_proj/kernel": (16, hidden),
             "mlp/down_proj/kernel": (hidden, 16)}
    assert shapes == {"embed_tokens/embedding": (VOCAB, 16), "norm/scale": (16,),
                      "head/kernel": (16, VOCAB),
                      **{f"layers/{i}/{k}": s for i in (0, 1) for k, s in layer.items()}}
    # the default filter prunes every projection and the head; embeddings and norms dense
    kept = {"/".join(str(k.key) for k in path) for path, keep in
            jax.tree_util.tree_flatten_with_path(prunable_leaves(params, default_prunable))[0]
            if keep}
    assert kept == {name for name in shapes if name.endswith("/kernel")}
    assert swiglu_hidden(128) == 352 and hidden == 64
    with pytest.raises(ValueError, match="context=8"):
        apply_model(model, params, {}, jnp.zeros((1, 9), jnp.int32), train=False)


def test_bad_options_and_datasets():
    with pytest.raises(ValueError, match="n_kv_head=3"):
        get_model("llama", VOCAB, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="even width"):
        get_model("llama", VOCAB, n_embd=12, n_head=4)
    with pytest.raises(TypeError, match="'dropout'"):
        get_model("llama", VOCAB, dropout=0.1)
    biased = get_model("llama", VOCAB, **TINY, use_bias=True).init(jax.random.key(0))["params"]
    assert biased["head"]["bias"].shape == (VOCAB,)
    assert biased["layers"]["1"]["mlp"]["down_proj"]["bias"].shape == (16,)
    with pytest.raises(ValueError, match="takes text"):
        check_model_dataset("llama", "mnist")


def test_output_at_t_ignores_later_tokens(tiny):
    model, params = tiny
    apply = jax.jit(lambda x: apply_model(model, params, {}, x, train=False)[0])
    x = tokens()
    changed = x.at[:, 5:].set((x[:, 5:] + 3) % VOCAB)
    before, after = apply(x), apply(changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])


def _head_outputs(module: Llama, x: jax.Array) -> jax.Array:
    """The attention output of layer 0 per query head: the input of ``o_proj`` (captured
    flat, one row per token), ``(tokens, n_head, head_dim)``."""
    path = ("layers", "0", "self_attn", "o_proj")
    captured = capture_linear_inputs(module, x, layers=[path])[path]
    return captured.reshape(captured.shape[0], -1, HEAD_DIM)


def test_grouped_query_heads_share_their_key_value_head(tiny):
    """4 query heads on 2 key/value heads: heads 0 and 1 read kv head 0, heads 2 and 3 kv
    head 1. Give query head 1 (same group) and head 2 (other group) head 0's query weights:
    head 1's output equals head 0's, head 2's does not."""
    model, params = tiny
    module = model.merge(params)
    kernel = module.layers[0].self_attn.q_proj.kernel
    head0 = kernel[...][:, :HEAD_DIM]
    kernel[...] = kernel[...].at[:, HEAD_DIM:2 * HEAD_DIM].set(head0)
    kernel[...] = kernel[...].at[:, 2 * HEAD_DIM:3 * HEAD_DIM].set(head0)
    out = _head_outputs(module, tokens())
    assert out.shape == (2 * CONTEXT, 4, HEAD_DIM)
    np.testing.assert_allclose(out[:, 1], out[:, 0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:, 2], out[:, 0], atol=1e-3)
    assert module.layers[0].self_attn.k_proj.kernel.shape == (16, 2 * HEAD_DIM)


def test_rope_is_relative():
    """RoPE's exact property: the query-key dot product after rotating the query to
    position ``m`` and the key to ``n`` depends on ``m - n`` only (a rotation of each
    feature pair by ``m theta`` and ``n theta``: their product is a rotation by ``(m - n)
    theta``), and a rotation keeps norms."""
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 6, 1, 8))
    positions = jnp.arange(6)

    def scores(shift: int) -> jax.Array:
        rq, rk = rope(q, positions + shift), rope(k, positions + shift)
        return jnp.einsum("btd,bsd->bts", rq[:, :, 0], rk[:, :, 0])

    for shift in (1, 7, 100):
        np.testing.assert_allclose(scores(shift), scores(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(rope(q, positions), axis=-1),
                               jnp.linalg.norm(q, axis=-1), rtol=1e-5)
    assert not np.allclose(rope(q, positions), q)  # and it does rotate


def test_the_model_sees_relative_positions_only(tiny):
    """Positions enter through RoPE alone, so every attention pattern, hence the logits,
    are the same with all positions shifted by a constant (up to float rounding)."""
    model, params = tiny
    module, x = model.merge(params), tokens()
    base = module(x)
    for shift in (3, 50):
        np.testing.assert_allclose(module(x, jnp.arange(CONTEXT) + shift), base,
                                   rtol=1e-4, atol=1e-4)
    # absolute positions would change them; a different relative layout does too
    assert not np.allclose(module(x, jnp.arange(CONTEXT) * 2), base, atol=1e-3)


def test_the_harness_adapter_round_trips_the_nnx_module(tiny):
    model, params = tiny
    module = model.merge(params)
    assert isinstance(module, Llama) and module.block_paths() == ["layers/0", "layers/1"]
    again = model.params_of(module)
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # init through the registry draws what the NNX constructor draws from the same key
    direct = nnx.state(Llama(VOCAB, **TINY, rngs=nnx.Rngs(jax.random.key(0))), nnx.Param)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    # apply_model under jit, the model a static argument: equal models, equal hashes
    assert model == get_model("llama", VOCAB, **TINY)
    step = jax.jit(apply_model, static_argnums=0, static_argnames="train")
    np.testing.assert_allclose(step(model, params, {}, tokens(), train=True)[0],
                               module(tokens()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected keys"):
        model.merge({k: v for k, v in params.items() if k != "norm"})


def test_train_a_few_steps_sparse(tmp_path):
    """``sparsejax train --model llama --method rigl --sparsity 0.8`` on a generated text
    (the tinyshakespeare format): finite losses, the asked sparsity on the kernels."""
    rng = np.random.default_rng(0)
    words = ["to be ", "or not ", "that is ", "the question\n", "Whether! "]
    (tmp_path / "input.txt").write_text(
        "".join(words[i] for i in rng.integers(0, len(words), 400))[:1000])
    config = TrainConfig(method="rigl", sparsity=0.8, model="llama",
                         dataset="tinyshakespeare", data_dir=str(tmp_path), steps=3,
                         batch_size=8, optimizer="adam", lr=1e-3, recipe="none",
                         progress=False, tensorboard=False, log_every=1,
                         model_options=dict(TINY, n_layer=1),
                         method_options={"update_every": 2}, out=str(tmp_path / "run"))
    result = train(config)
    assert result["steps"] == 3 and math.isfinite(result["test_loss"])
    assert abs(result["sparsity"] - 0.8) < 0.01
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(r["loss"]) for r in lines)
