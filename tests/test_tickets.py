"""Strong tickets as files: export a finished run, reload it from the seed, same outputs."""

import io
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.harness.cli import main
from sparsejax.harness.models import apply_model
from sparsejax.harness.tickets import evaluate_ticket, export_ticket, load_ticket
from sparsejax.harness.training.loop import TrainConfig, prepare, train
from sparsejax.io.checkpoint import Checkpointer
from sparsejax.io.tickets import pack_masks, unpack_masks

FAST = dict(dataset="mnist1d", model="lenet300", batch_size=32, progress=False, log_every=10,
            steps=20)


@pytest.fixture(scope="module", autouse=True)
def generate_mnist1d_once():
    """Every export and load rebuilds the run's dataset; generate mnist1d once here."""
    import sparsejax.harness.data
    import sparsejax.harness.training.loop

    cache = {}
    original = sparsejax.harness.data.load_dataset

    def cached(name, data_dir=None, **kwargs):
        key = (name, data_dir, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(name, data_dir, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparsejax.harness.data, "load_dataset", cached)
        patch.setattr(sparsejax.harness.training.setup, "load_dataset", cached)
        yield


def _train(tmp_path_factory, method, **options):
    out = tmp_path_factory.mktemp(method) / "run"
    config = TrainConfig(method=method, sparsity=0.7, out=str(out), **FAST, **options)
    return out, train(config)


@pytest.fixture(scope="module", params=[
    "edge_popup", "gates", pytest.param("biprop", marks=pytest.mark.slow)])
def finished_run(request, tmp_path_factory):
    options = {}
    if request.param == "biprop":  # no biases, a global threshold and a density ramp
        options = {"model_options": {"use_bias": False},
                   "method_options": {"scope": "global", "ramp_epochs": 0.01}}
    return _train(tmp_path_factory, request.param, **options)


@pytest.fixture(scope="module")
def exported(finished_run):
    out, result = finished_run
    summary = export_ticket(out, out.parent / "ticket.npz")
    return out, result, summary, load_ticket(summary["ticket"])


def test_reloaded_ticket_gives_bitwise_equal_logits(exported):
    out, result, summary, ticket = exported
    config = TrainConfig(**result["config"])
    run = prepare(config)
    _, state, _ = Checkpointer(out / "checkpoints").restore(run.state)
    apply = jax.jit(apply_model, static_argnums=0, static_argnames="train")
    images = run.dataset.test_images[:500]
    trained = apply(run.model, jax.jit(run.method.effective_params)(state), state.model_state,
                    images, train=False)[0]
    reloaded = apply(ticket.model, ticket.params, ticket.model_state, images, train=False)[0]
    assert np.array_equal(np.asarray(trained).view(np.uint32),
                          np.asarray(reloaded).view(np.uint32))
    # the gates keep no hard mask in the state; they derive it when asked
    for a, b in zip(jax.tree_util.tree_leaves(run.method.hard_masks(state)),
                    jax.tree_util.tree_leaves(ticket.masks), strict=True):
        assert np.array_equal(a, b)
    # the whole test set: the same accuracy as the trained run reported
    assert evaluate_ticket(ticket)["accuracy"] == result["test_accuracy"]


def test_ticket_stores_about_one_bit_per_weight(exported):
    out, result, summary, ticket = exported
    sizes = [int(np.prod(row["shape"])) for row in ticket.header["masks"]]
    assert summary["packed_mask_bytes"] == sum(math.ceil(n / 8) for n in sizes)
    assert summary["weights"] == sum(sizes)
    assert summary["model_state_bytes"] == 0  # LeNet-300-100 has no batch statistics
    assert summary["ticket_bytes"] == os.path.getsize(summary["ticket"])
    assert summary["ticket_bytes"] < summary["float32_params_bytes"] / 20
    kept = sum(row["kept"] for row in ticket.header["masks"] if len(row["shape"]) > 1)
    kernels = sum(n for n, row in zip(sizes, ticket.header["masks"], strict=True)
                  if len(row["shape"]) > 1)
    assert abs(kept - 0.3 * kernels) <= 3  # exact per layer or in total, rounded


def test_cli_exports_and_evaluates(finished_run, tmp_path, capsys):
    out, result = finished_run
    ticket = tmp_path / "t.npz"
    assert main(["export-ticket", str(out), "--output", str(ticket)]) == 0
    assert "bytes of packed masks" in capsys.readouterr().out
    assert main(["evaluate-ticket", str(ticket)]) == 0
    assert f"{100 * result['test_accuracy']:.2f}%" in capsys.readouterr().out


@pytest.mark.slow  # 23 s: trains a supermask_weights run first
def test_a_run_that_trained_its_weights_is_refused(tmp_path_factory, capsys):
    out, _ = _train(tmp_path_factory, "supermask_weights")
    with pytest.raises(ValueError, match="not the frozen ones"):
        export_ticket(out)
    assert main(["export-ticket", str(out)]) == 2
    assert "not the frozen ones" in capsys.readouterr().err


def _rewrite(src: Path, dst: Path, change) -> None:
    with np.load(src) as archive:
        arrays = {k: archive[k] for k in archive.files}
    header = json.loads(arrays["header"].tobytes())
    change(header, arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    dst.write_bytes(buffer.getvalue())


def test_damaged_or_foreign_files_are_clear_errors(exported, tmp_path):
    _, _, summary, _ = exported
    src = Path(summary["ticket"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a sparsejax ticket"):
        load_ticket(bad)

    def other_seed(header, arrays):
        header["config"]["seed"] += 1

    _rewrite(src, bad, other_seed)
    with pytest.raises(ValueError, match="regenerated from the seed .* differ"):
        load_ticket(bad)

    def newer(header, arrays):
        header["version"] = 99

    _rewrite(src, bad, newer)
    with pytest.raises(ValueError, match="version 99"):
        load_ticket(bad)

    def flip_a_bit(header, arrays):
        arrays["mask_00000"] = arrays["mask_00000"] ^ np.uint8(1)

    _rewrite(src, bad, flip_a_bit)
    with pytest.raises(ValueError, match="damaged|differ"):
        load_ticket(bad)
    with pytest.raises(FileNotFoundError, match="result.json"):
        export_ticket(tmp_path)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 13), st.integers(1, 7)), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_pack_and_unpack_round_trip(shapes, seed):
    rng = np.random.default_rng(seed)
    masks = {f"l{i}": rng.random(shape) < 0.3 for i, shape in enumerate(shapes)}
    rows, packed = pack_masks(masks)
    assert [b.nbytes for b in packed] == [math.ceil(a * b / 8) for a, b in shapes]
    back = unpack_masks(rows, packed, masks)
    for key in masks:
        assert np.array_equal(back[key], masks[key])


@pytest.mark.slow
def test_ticket_of_a_batch_norm_model_stores_its_statistics(tmp_path):
    mnist = Path(os.environ.get("SPARSEJAX_MNIST",
                              Path(__file__).resolve().parents[2] / "shared/data/mnist"))
    if not mnist.exists():
        pytest.skip("real MNIST not available")
    out = tmp_path / "run"
    config = TrainConfig(method="edge_popup", sparsity=0.5, model="conv2", dataset="mnist",
                         data_dir=str(mnist), batch_size=32, steps=10, progress=False,
                         out=str(out), model_options={"norm": "batch", "norm_affine": False,
                                                      "use_bias": False})
    result = train(config)
    summary = export_ticket(out)
    ticket = load_ticket(summary["ticket"])
    stats = jax.tree_util.tree_leaves(ticket.model_state)
    assert stats and summary["model_state_bytes"] == sum(s.size * 4 for s in stats)
    assert evaluate_ticket(ticket)["accuracy"] == result["test_accuracy"]
