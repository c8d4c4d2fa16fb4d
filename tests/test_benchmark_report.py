"""benchmarks/report.py turns every raw result in benchmarks/results/ into a table, as
docs/benchmarks.md says (a new kind of row that it misreads fails here)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = sorted((BENCHMARKS / "results").glob("*.json"))


def _report():
    spec = importlib.util.spec_from_file_location("report", BENCHMARKS / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_result_file_makes_a_table(path, capsys):
    _report().main([str(path)])
    table = capsys.readouterr().out
    assert table.startswith("|") and "| --- |" in table
