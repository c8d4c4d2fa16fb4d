"""``sparsejax prune`` through the block-by-block driver (issue #30): a GPT run pruned
block by block with its head dense (the default), the old whole-model driver and the
head on request; the LLaMA-style NNX model pruned by prune_blocks in-process (exact
counts at 50% and 2:4) and through the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_checks import fails

from sparsejax.core.patterns import nm_groups
from sparsejax.harness.cli import main
from sparsejax.harness.models import get_model, init_model
from sparsejax.harness.prune_run import model_blocks, prune_run
from sparsejax.harness.training.run_folder import restore_finished_run
from sparsejax.posttrain.blocks import prune_blocks

WORDS = ["to be ", "or not ", "that is ", "the question\n", "Whether! "]
GPT_LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2"]
LLAMA_LAYERS = ["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"]


def _text(folder):
    rng = np.random.default_rng(0)
    (folder / "input.txt").write_text("".join(WORDS[i] for i in rng.integers(0, 5, 400))[:1000])
    return folder


def _train(folder, model: str, options: list[str]):
    out = folder / "run"
    args = ["train", "--method", "dense", "--model", model, "--dataset", "tinyshakespeare",
            "--data-dir", str(folder), "--steps", "10", "--batch-size", "16", "--optimizer",
            "adam", "--lr", "1e-2", "--recipe", "none", "--out", str(out), "--no-progress",
            "--no-tensorboard"]
    for option in options:
        args += ["--model-option", option]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A tiny GPT (2 blocks, 16 wide, context 8) trained 10 steps on a generated text."""
    folder = _text(tmp_path_factory.mktemp("gpt"))
    return _train(folder, "gpt", ["n_layer=2", "n_embd=16", "n_head=2", "context=8"])


def _result(run, name):
    return json.loads((run / "prune" / name / "result.json").read_text())


def _kernels(params) -> dict[str, np.ndarray]:
    return {"/".join(str(k.key) for k in path[:-1]): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if path[-1].key == "kernel"}


def test_gpt_prunes_block_by_block_with_the_head_dense(gpt_run, capsys):
    assert main(["prune", "--method", "sparsegpt", "--pattern", "2:4",
                 "--calibration-examples", "300", str(gpt_run)]) == 0
    assert "nats/char" in capsys.readouterr().out
    result = _result(gpt_run, "sparsegpt_2of4_seed0")
    assert result["driver"] == "blocks" and result["head_pruned"] is False
    assert [r["name"] for r in result["layers"]] == [f"block{b}/{n}" for b in (1, 2)
                                                     for n in GPT_LAYERS]
    assert all(r["density"] == 0.5 for r in result["layers"])
    # exact: half of each block's 3072 kernel weights, none of the head's 16 x vocab
    vocab = restore_finished_run(gpt_run).run.dataset.num_classes
    assert result["sparsity"] == pytest.approx(3072 / (2 * 3072 + 16 * vocab), abs=1e-12)
    assert result["calibration_examples"] == 300 and "validation_loss_nats_per_char" in result
    # the same numbers as prune_blocks called in-process on the same calibration windows
    finished = restore_finished_run(gpt_run)
    images = finished.run.dataset.train_images
    chosen = np.sort(np.random.default_rng(0).permutation(len(images))[:300])
    _, report = prune_blocks(finished.run.model, finished.state.params, images[chosen],
                             "sparsegpt", "2:4", blocks=["block1", "block2"], batch_size=256,
                             apply_kwargs={"train": False})
    np.testing.assert_allclose([r["reconstruction_error"] for r in result["layers"]],
                               [r.reconstruction_error for r in report], rtol=1e-5)


def test_gpt_keeps_the_old_driver_and_prunes_the_head_on_request(gpt_run, tmp_path):
    old = prune_run(gpt_run, "wanda", "4:8", calibration_examples=200, driver="sequential",
                    out=tmp_path / "sequential")
    assert old["driver"] == "sequential" and old["head_pruned"] is True
    assert [r["name"] for r in old["layers"]][-1] == "head"
    assert old["sparsity"] == 0.5
    head = prune_run(gpt_run, "wanda", "4:8", calibration_examples=200, prune_head=True,
                     out=tmp_path / "head")
    assert head["driver"] == "blocks" and head["head_pruned"] is True
    assert [r["name"] for r in head["layers"]] == [r["name"] for r in old["layers"]]
    assert head["sparsity"] == 0.5 and all(r["density"] == 0.5 for r in head["layers"])
    # block 1 sees the same dense inputs either way; the head is calibrated on pruned features
    assert head["layers"][0]["reconstruction_error"] == pytest.approx(
        old["layers"][0]["reconstruction_error"], rel=1e-5)
    dense_head = prune_run(gpt_run, "wanda", "4:8", driver="sequential", prune_head=False,
                           out=tmp_path / "dense")
    assert dense_head["head_pruned"] is False and dense_head["sparsity"] < 0.5
    assert dense_head["calibration_examples"] == 128  # the references' nsamples, by default
    assert "head" not in [r["name"] for r in dense_head["layers"]]


def test_model_blocks_of_the_zoo():
    assert model_blocks(get_model("gpt", 5, n_layer=3)) == ["block1", "block2", "block3"]
    assert model_blocks(get_model("llama", 5, n_layer=2, n_embd=16)) == ["layers/0", "layers/1"]
    assert model_blocks(get_model("lenet300", 10)) is None


LLAMA = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, context=8, mlp_hidden=64)


@pytest.fixture(scope="module")
def llama():
    model = get_model("llama", 11, **LLAMA)
    params, _ = init_model(model, jax.random.key(0), (1, 8))
    tokens = jax.random.randint(jax.random.key(1), (16, 8), 0, 11)
    return model, params, tokens


@pytest.mark.parametrize("method, pattern, sparsity", [("wanda", "unstructured", 0.5),
                                                       ("sparsegpt", "2:4", None)])
def test_llama_pruned_block_by_block_exact_counts(llama, method, pattern, sparsity):
    """prune_blocks on the NNX module (params=None), its blocks ``layers/0`` and
    ``layers/1``: every projection keeps exactly half of its weights (Wanda: half of
    each output's inputs; 2:4: two of every four consecutive inputs), and the head,
    the embeddings and the norms are the trained ones."""
    model, params, tokens = llama
    module = model.merge(params)
    pruned_module, report = prune_blocks(module, None, tokens, method, pattern, sparsity,
                                         blocks=module.block_paths(), batch_size=8)
    assert [r.name for r in report] == [f"layers/{i}/{n}" for i in (0, 1)
                                        for n in LLAMA_LAYERS]
    assert all(r.density == 0.5 for r in report)
    pruned = model.params_of(pruned_module)
    before, after = _kernels(params), _kernels(pruned)
    for name, kernel in after.items():
        if name == "head":
            np.testing.assert_array_equal(kernel, before[name])
            continue
        kept = kernel != 0
        assert kept.sum() == kernel.size // 2, name
        if pattern == "2:4":
            assert np.all(np.asarray(nm_groups(jnp.asarray(kept), "2:4").sum(axis=1)) == 2)
        else:
            assert np.all(kept.sum(axis=0) == kernel.shape[0] // 2), name
    for a, b in zip(jax.tree.leaves({k: v for k, v in params.items() if k != "layers"}),
                     jax.tree.leaves({k: v for k, v in pruned.items() if k != "layers"}),
                     strict=True):
        np.testing.assert_array_equal(a, b)
    for i in ("0", "1"):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_array_equal(pruned["layers"][i][norm]["scale"],
                                          params["layers"][i][norm]["scale"])
    # the user's module is untouched
    np.testing.assert_array_equal(module.layers[0].mlp.up_proj.kernel[...],
                                  params["layers"]["0"]["mlp"]["up_proj"]["kernel"])


def test_llama_run_through_the_cli(tmp_path_factory, capsys):
    folder = _text(tmp_path_factory.mktemp("llama"))
    run = _train(folder, "llama", [f"{k}={v}" for k, v in LLAMA.items() if k != "n_layer"]
                 + ["n_layer=1"])
    assert main(["prune", "--method", "sparsegpt", "--pattern", "unstructured",
                 "--sparsity", "0.5", "--calibration-examples", "100", str(run)]) == 0
    assert "nats/char" in capsys.readouterr().out
    result = _result(run, "sparsegpt_unstructured_s0.5_seed0")
    assert result["driver"] == "blocks" and result["head_pruned"] is False
    assert [r["name"] for r in result["layers"]] == [f"layers/0/{n}" for n in LLAMA_LAYERS]
    assert np.isfinite(result["validation_loss_nats_per_char"])
    # block kernels: 32 * (32 + 16 + 16 + 32) + 3 * 32 * 64 = 9216, half pruned; head 32 x V
    vocab = restore_finished_run(run).run.dataset.num_classes
    assert result["sparsity"] == pytest.approx(4608 / (9216 + 32 * vocab), abs=1e-12)
    fails(capsys, ["prune", "--method", "wanda", "--sparsity", "0.5", "--driver",
                   "sequential", str(run)], "linen models only")
