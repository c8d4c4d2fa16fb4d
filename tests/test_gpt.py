"""The small GPT and the character-level text dataset (tinyshakespeare's format) on a tiny
generated corpus: causal masking, shapes, windows and split, a few training steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.core.masks import default_prunable, prunable_leaves
from sparsejax.harness.data import DatasetNotAvailableError, load_dataset, train_batches
from sparsejax.harness.models import apply_model, get_model, init_model
from sparsejax.harness.training.loop import TrainConfig, evaluate, make_eval_step, train

TINY = dict(n_layer=1, n_embd=16, n_head=2, context=8)
CONTEXT = 8
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder with input.txt: 1,000 characters of a small vocabulary."""
    folder = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(0)
    words = ["to be ", "or not ", "that is ", "the question\n", "Whether! "]
    text = "".join(words[i] for i in rng.integers(0, len(words), 400))[:1000]
    (folder / "input.txt").write_text(text)
    return folder


def tiny_gpt(vocab: int = 11):
    model = get_model("gpt", vocab, **TINY)
    params, state = init_model(model, jax.random.key(0), (1, CONTEXT))
    return model, params, state


def test_output_at_t_ignores_later_tokens():
    model, params, state = tiny_gpt()
    tokens = jax.random.randint(jax.random.key(1), (2, CONTEXT), 0, 11)
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 3) % 11)
    apply = jax.jit(lambda x: apply_model(model, params, state, x, train=False)[0])
    before, after = apply(tokens), apply(changed)
    assert before.shape == (2, CONTEXT, 11)
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])  # and the later ones do change


def test_shapes_shorter_sequences_and_prunable_leaves():
    model, params, state = tiny_gpt()
    assert params["pos_embed"]["embedding"].shape == (CONTEXT, 16)
    assert params["token_embed"]["embedding"].shape == (11, 16)
    logits, _ = apply_model(model, params, state, jnp.zeros((3, 5), jnp.int32), train=False)
    assert logits.shape == (3, 5, 11)
    with pytest.raises(ValueError, match="context=8"):
        apply_model(model, params, state, jnp.zeros((1, 9), jnp.int32), train=False)
    pruned = {"/".join(str(k.key) for k in path)
              for path, keep in jax.tree_util.tree_flatten_with_path(
                  prunable_leaves(params, default_prunable))[0] if keep}
    assert pruned == {f"block1/{layer}/kernel" for layer in
                      ("attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2")
                      } | {"head/kernel"}
    with pytest.raises(ValueError, match="n_head"):
        get_model("gpt", 11, n_embd=10, n_head=4)


def test_text_dataset_split_and_windows(corpus):
    data = load_dataset("tinyshakespeare", corpus, context=CONTEXT)
    text = (corpus / "input.txt").read_text()
    vocabulary = "".join(sorted(set(text)))
    assert data.vocabulary == vocabulary and data.num_classes == len(vocabulary)
    ids = np.array([vocabulary.index(c) for c in text])
    train, valid = ids[:900], ids[900:]
    # training windows at every offset of the first 90%, labels shifted by one character
    assert data.train_images.shape == data.train_labels.shape == (900 - CONTEXT, CONTEXT)
    for i in (0, 1, 891):
        np.testing.assert_array_equal(data.train_images[i], train[i:i + CONTEXT])
        np.testing.assert_array_equal(data.train_labels[i], train[i + 1:i + 1 + CONTEXT])
    # validation: non-overlapping windows of the last 10%
    count = (100 - 1) // CONTEXT
    assert data.test_images.shape == data.test_labels.shape == (count, CONTEXT)
    np.testing.assert_array_equal(data.test_images.ravel(), valid[:count * CONTEXT])
    np.testing.assert_array_equal(data.test_labels.ravel(), valid[1:count * CONTEXT + 1])
    assert data.train_images.dtype == data.test_labels.dtype == np.int32
    _, batch = next(train_batches(data, 4, seed=0))
    assert batch["image"].shape == batch["label"].shape == (4, CONTEXT)


def test_padded_evaluation_counts_tokens_of_real_examples_only(corpus):
    data = load_dataset("tinyshakespeare", corpus, context=CONTEXT)
    model, params, state = tiny_gpt(data.num_classes)
    step = jax.jit(make_eval_step(model))
    whole = evaluate(step, (params, state), data, batch_size=len(data.test_labels))
    padded = evaluate(step, (params, state), data, batch_size=5)  # 12 = 5 + 5 + 2 (+3 pads)
    logits, _ = jax.jit(apply_model, static_argnums=0, static_argnames="train")(
        model, params, state, data.test_images, train=False)  # one program, not op by op
    expected = -np.mean(np.take_along_axis(jax.nn.log_softmax(logits),
                                           data.test_labels[..., None], -1))
    for result in (whole, padded):
        assert math.isclose(result["loss"], float(expected), rel_tol=1e-5)
    assert math.isclose(whole["accuracy"], padded["accuracy"], rel_tol=1e-6)


# No dense case: test_prune_cli's gpt_run trains a dense GPT through the same loop on a
# text file (`sparsejax train --method dense --model gpt`) and checks its result.
@pytest.mark.parametrize("method, sparsity", [("rigl", 0.8)])
def test_train_a_few_steps(corpus, tmp_path, method, sparsity):
    config = TrainConfig(method=method, sparsity=sparsity, model="gpt",
                         dataset="tinyshakespeare", data_dir=str(corpus), steps=3,
                         batch_size=8, optimizer="adam", lr=1e-3, recipe="none",
                         progress=False, tensorboard=False, log_every=1,
                         model_options=dict(TINY), out=str(tmp_path / "run"))
    if method == "rigl":
        config.method_options = {"update_every": 2}
    result = train(config)
    assert math.isfinite(result["test_loss"]) and result["steps"] == 3
    assert 0.0 <= result["test_accuracy"] <= 1.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in lines)
    if sparsity:
        assert abs(result["sparsity"] - sparsity) < 0.01


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match=r"input\.txt not found"):
        load_dataset("tinyshakespeare", tmp_path)
    with pytest.raises(DatasetNotAvailableError, match="--data-dir"):
        load_dataset("tinyshakespeare")
    (tmp_path / "input.txt").write_text("abc")
    with pytest.raises(ValueError, match="too few"):
        load_dataset("tinyshakespeare", tmp_path, context=8)


@pytest.mark.skipif(not (SHAKESPEARE / "input.txt").is_file(),
                    reason="no tinyshakespeare corpus on this machine")
def test_the_real_corpus():
    data = load_dataset("tinyshakespeare", SHAKESPEARE)
    assert data.num_classes == 65 and data.input_shape == (64,)
    assert len(data.train_labels) == int(1115394 * 0.9) - 64
    assert data.test_images.shape == ((1115394 - int(1115394 * 0.9) - 1) // 64, 64)


def test_text_datasets_refuse_a_validation_split(corpus):
    """Overlapping windows would leak the held-out text into training."""
    from sparsejax.harness.data import split_validation

    data = load_dataset("tinyshakespeare", corpus, context=CONTEXT)
    with pytest.raises(ValueError, match="overlapping text windows"):
        split_validation(data, 10)


def test_tinyshakespeare_through_tfds_equals_the_text_file(tmp_path):
    """Without DIR/input.txt the text comes from TFDS's tiny_shakespeare (mocked here with
    the test corpus cut as TFDS cuts it: train, then validation and test) and gives the
    same dataset as the file."""
    tfds = pytest.importorskip("tensorflow_datasets")
    text = "".join(["to be ", "or not ", "to be, that is ", "the question\n"] * 20)
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "input.txt").write_text(text)
    split = int(len(text) * 0.9)
    parts = {"train": text[:split], "validation": text[split:split + 20],
             "test": text[split + 20:]}

    def source(self, split, **kwargs):
        return [{"text": parts[split].encode()}]

    with tfds.testing.mock_data(as_data_source_fn=source):
        from_tfds = load_dataset("tinyshakespeare", tmp_path / "tfds", context=8)
    from_file = load_dataset("tinyshakespeare", tmp_path / "file", context=8)
    assert from_tfds.vocabulary == from_file.vocabulary
    for a, b in zip(from_tfds[1:5], from_file[1:5], strict=True):
        np.testing.assert_array_equal(a, b)
