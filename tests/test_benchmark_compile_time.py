"""benchmarks/compile_time.py's rows run in-process on tiny cases, so the benchmark that
times compiles cannot rot; and its steps are the forms it says (the user's optax step
with sparse_tx, the native engine's step for the score methods)."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("method,form", [("plain", "optax"), ("rigl", "optax"),
                                         ("gates", "native")])
def test_a_row_times_lowering_and_compiling_one_step(method, form, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compile_time

    row = compile_time.one_row("mlp2", method)
    assert row["model"] == "mlp2" and row["method"] == method and row["form"] == form
    assert row["kernels"] == 2
    assert row["init_s"] > 0 and row["lower_s"] > 0 and row["compile_s"] > 0
    assert row["total_s"] == pytest.approx(row["lower_s"] + row["compile_s"], abs=2e-3)


def test_sparsegpt_rows_compile_both_patterns(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compile_time

    rows = compile_time.sparsegpt_row(200, n_out=8)  # a full block and a narrower one
    assert [r["method"] for r in rows] == ["sparsegpt unstructured", "sparsegpt 2:4"]
    assert all(r["compile_s"] > 0 and r["model"] == "kernel 200x8" for r in rows)
