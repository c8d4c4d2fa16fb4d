"""The sparse-forward and post-training benchmarks run end to end on tiny models."""

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their neighbours
    return importlib.import_module


def test_sparse_forward_runs_and_counts_stored_bytes(bench, tmp_path):
    out = tmp_path / "forward.json"
    rows = bench("sparse_forward").main(
        ["--tiny", "--models", "gpt", "--sparsities", "0.9", "--repeats", "1",
         "--block", "1", "--note", "test", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    # the GPT only (LeNet's sparse forward is checked in tests/test_export.py)
    by_form = {(r["form"], r["pattern"], r["sparsity"]): r for r in rows}
    assert set(by_form) == {("dense", "none", 0.0), ("bcoo", "unstructured", 0.9),
                            ("bcoo", "2:4", 0.5), ("nm_packed", "2:4", 0.5),
                        ("nm_unpacked", "2:4", 0.5)}
    dense = by_form["dense", "none", 0.0]
    assert dense["ratio"] == 1.0 and dense["note"] == "test"
    assert dense["device"].split(":")[0] == dense["backend"]  # e.g. "cpu: <its model>"
    weights = dense["kernel_bytes"] // 4  # float32 kernels
    # BCOO: a float32 value and two int32 indices per kept weight; packed 2:4: a
    # float32 value and a uint8 position for every other weight
    assert by_form["bcoo", "2:4", 0.5]["kernel_bytes"] == 12 * weights // 2
    assert by_form["nm_packed", "2:4", 0.5]["kernel_bytes"] == 5 * weights // 2
    assert by_form["nm_packed", "2:4", 0.5]["bytes_ratio"] == 0.625
    assert by_form["nm_unpacked", "2:4", 0.5]["kernel_bytes"] == 5 * weights // 2
    unstructured = by_form["bcoo", "unstructured", 0.9]["kernel_bytes"]
    assert unstructured % 12 == 0 and 0.09 < unstructured / 12 / weights < 0.11


def test_posttrain_layers_runs_per_layer(bench, tmp_path):
    rows = bench("posttrain_layers").main(
        ["--tiny", "--windows", "2", "--context", "8", "--layers", "2", "--patterns", "2:4",
         "--repeats", "1", "--json", str(tmp_path / "layers.json")])
    assert [(r["layer"], r["method"]) for r in rows] == [
        ("block1/attn/key/kernel", "sparsegpt"), ("block1/attn/key/kernel", "wanda"),
        ("block1/attn/out/kernel", "sparsegpt"), ("block1/attn/out/kernel", "wanda")]
    assert [r["new_shape"] for r in rows] == [True, True, False, False]  # both 16x16
    for row in rows:
        assert row["tokens"] == 16 and row["shape"] == [16, 16]
        assert row["peak_bytes"] == row["temp_bytes"] + row["argument_bytes"] + row[
            "output_bytes"]
        assert row["argument_bytes"] == 4 * (16 * 16 + 16 * 16)  # kernel and inputs
        assert row["hessian_bytes"] == (16 * 16 * 4 if row["method"] == "sparsegpt" else 0)
    assert rows[0]["ratio_to_wanda"] == pytest.approx(
        rows[0]["steady_ms"] / rows[1]["steady_ms"], abs=0.01)
