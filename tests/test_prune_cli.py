"""``sparsejax prune``: one-shot post-training pruning of a finished run (issue #20)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from cli_checks import fails

from sparsejax.core.patterns import nm_groups
from sparsejax.harness.cli import main
from sparsejax.harness.prune_run import prune_run
from sparsejax.harness.training.run_folder import restore_finished_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small dense MLP (40-16-10) trained 60 steps on MNIST-1D."""
    out = tmp_path_factory.mktemp("prune") / "run"
    assert main(["train", "--method", "dense", "--model", "mlp", "--model-option",
                 "hidden=[16]", "--dataset", "mnist1d", "--steps", "60", "--recipe", "none",
                 "--out", str(out), "--no-progress", "--no-tensorboard"]) == 0
    return out


def test_prune_writes_a_result_with_before_and_after(run_dir, capsys):
    assert main(["prune", "--method", "sparsegpt", "--pattern", "2:4",
                 "--calibration-examples", "256", str(run_dir)]) == 0
    assert "->" in capsys.readouterr().out
    result = json.loads((run_dir / "prune" / "sparsegpt_2of4_seed0" / "result.json")
                        .read_text())
    assert result["sparsity"] == 0.5 and result["pattern"] == "2:4"
    assert [layer["name"] for layer in result["layers"]] == ["fc1", "head"]
    assert all(layer["density"] == 0.5 for layer in result["layers"])
    assert result["before"]["sparsity"] == 0.0 and result["calibration_examples"] == 256
    trained = json.loads((run_dir / "result.json").read_text())
    assert result["before"]["test_accuracy"] == trained["test_accuracy"]
    assert 0.0 <= result["test_accuracy"] <= 1.0 and np.isfinite(result["test_loss"])
    assert result["provenance"]["versions"]["jax"]


def test_every_group_of_the_pruned_kernels_keeps_n_and_sparsegpt_beats_magnitude(run_dir,
                                                                                tmp_path):
    results = {m: prune_run(run_dir, m, "unstructured", 0.7, calibration_examples=512,
                            out=tmp_path / m) for m in ("magnitude", "sparsegpt")}
    errors = {m: [layer["reconstruction_error"] for layer in r["layers"]]
              for m, r in results.items()}
    assert errors["sparsegpt"][0] < errors["magnitude"][0]  # fc1, the same inputs
    # per block of 128 columns: 192 of 640 and 48 of 160 kept, 240 of 800 in all
    assert results["sparsegpt"]["sparsity"] == pytest.approx(0.7, abs=1e-9)
    # the N:M counts, on the pruned kernels themselves
    from sparsejax.posttrain.sequential import prune_mlp_sequential

    finished = restore_finished_run(run_dir)
    pruned, _ = prune_mlp_sequential(finished.state.params,
                                     finished.run.dataset.train_images[:128], "wanda", "2:4")
    for layer in ("fc1", "head"):
        nonzero = nm_groups(jnp.asarray(pruned[layer]["kernel"]) != 0, "2:4").sum(axis=1)
        assert np.all(np.asarray(nonzero) == 2)  # Wanda keeps trained, non-zero weights


def test_bad_requests_are_one_line_errors(run_dir, capsys, tmp_path):
    fails(capsys, ["prune", "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7",
                   str(run_dir)], "2:4 fixes the density at 0.5")
    fails(capsys, ["prune", "--method", "wanda", str(run_dir)], "needs a --sparsity")
    fails(capsys, ["prune", "--method", "wanda", "--sparsity", "0.5",
                   str(tmp_path / "none")], "not found")
    first = ["prune", "--method", "magnitude", "--sparsity", "0.5", "--out",
             str(tmp_path / "again"), str(run_dir)]
    assert main(first) == 0
    fails(capsys, first, "exists; pass --overwrite")
    assert main([*first, "--overwrite"]) == 0


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A tiny GPT (1 layer, 16 wide, context 8) trained 20 steps on a generated text."""
    folder = tmp_path_factory.mktemp("gpt")
    words = ["to be ", "or not ", "that is ", "the question\n", "Whether! "]
    rng = np.random.default_rng(0)
    (folder / "input.txt").write_text("".join(words[i] for i in rng.integers(0, 5, 400))[:1000])
    out = folder / "run"
    assert main(["train", "--method", "dense", "--model", "gpt", "--model-option", "n_layer=1",
                 "--model-option", "n_embd=16", "--model-option", "n_head=2",
                 "--model-option", "context=8", "--dataset", "tinyshakespeare", "--data-dir",
                 str(folder), "--steps", "20", "--batch-size", "16", "--optimizer", "adam",
                 "--lr", "1e-2", "--recipe", "none", "--out", str(out), "--no-progress",
                 "--no-tensorboard"]) == 0
    return out


def test_prune_a_gpt_run_reports_nats_per_char_and_every_dense_layer(gpt_run, capsys):
    assert main(["prune", "--method", "wanda", "--pattern", "4:8", "--calibration-examples",
                 "300", "--seed", "1", str(gpt_run)]) == 0
    assert "nats/char" in capsys.readouterr().out
    result = json.loads((gpt_run / "prune" / "wanda_4of8_seed1" / "result.json").read_text())
    # block by block, the head dense: the reference code's default (prune_blocks)
    assert (result["driver"], result["head_pruned"]) == ("blocks", False)
    assert [layer["name"] for layer in result["layers"]] == [
        "block1/attn/query", "block1/attn/key", "block1/attn/value", "block1/attn/out",
        "block1/fc1", "block1/fc2"]
    assert all(layer["density"] == 0.5 for layer in result["layers"])
    assert result["calibration_examples"] == 300  # two batches: 256 + 44 windows
    trained = json.loads((gpt_run / "result.json").read_text())
    assert result["before"]["validation_loss_nats_per_char"] == trained["test_loss"]
    assert result["validation_loss_nats_per_char"] == result["test_loss"]
    assert result["validation_loss_nats_per_char"] > trained["test_loss"] - 0.05
    # every projection is pruned; the head, embeddings and LayerNorms stay dense
    assert 0.3 < result["sparsity"] < 0.5
