"""The device suite (benchmarks/device_suite.py) runs end to end with ``--tiny`` on a CPU,
so the script that times a GPU when one is lent cannot rot.

The script runs as ``__main__`` (its command line parsed, its JSON written) in this
process rather than in a subprocess: the same code end to end, without a second import of
jax, flax and sparsejax (about 5 s of the test's 20)."""

import json
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_tiny_suite_writes_every_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from step_time import METHOD_OPTIONS

    out = tmp_path / "suite.json"
    script = BENCHMARKS / "device_suite.py"
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds its folder
    monkeypatch.setattr(sys, "argv", [str(script), "--tiny", "--json", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["skipped"] == []
    assert result["device_kind"] and result["backend"] == "cpu"
    assert result["device"].startswith("cpu: ")  # host() names the CPU model
    rows = {(r["model"], r["method"]): r for r in result["step_time"]}
    assert set(rows) == {("lenet300", "rigl"), ("gpt", "edge_popup")}
    for (model, method), row in rows.items():
        # each row times what the suite asked for: --tiny's batch of 4, the options of
        # step_time.py (RigL's update interval, none for Edge-Popup), updates inside blocks
        assert row["model"] == model and row["method"] == method
        assert row["batch_size"] == 4 and row["amortize"] == "blocks"
        assert row["update_interval"] == METHOD_OPTIONS[method].get("update_every")
        assert row["dense_ms"] > 0 and row["method_ms"] > 0 and row["optax_dense_ms"] > 0
        assert row["device"] == result["device"]
    assert rows[("lenet300", "rigl")]["update_interval"] == 100
    assert rows[("gpt", "edge_popup")]["update_interval"] is None
    assert {r["algorithm"] for r in result["topk"]} == {"sampled", "bitwise", "sort"}


def test_a_spent_budget_lists_what_it_skipped(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import device_suite

    result = device_suite.run_suite(tiny=True, budget_seconds=0)  # nothing compiles
    assert result["step_time"] == [] and result["topk"] == []
    assert result["skipped"] == ["step_time lenet300 rigl", "step_time gpt edge_popup",
                                 "topk n=1000"]
