"""``sparsejax demo`` (issue #22): every method of the demo trains into its own folder,
and the table, ``demo.json`` and ``demo.png`` come out; a second demo into the same
folder is refused unless ``--overwrite``."""

import json

import pytest
from cli_checks import fails

from sparsejax.harness.cli import build_parser
from sparsejax.harness.demo import DEMO_METHODS, format_table, run_demo
from sparsejax.harness.provenance import provenance

STEPS = 3  # the demo's settings, three steps a method


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = []
    rows = run_demo(out, sparsity=0.8, seed=1, steps=STEPS, progress=False,
                    echo=printed.append)
    return out, rows, printed


def test_one_run_folder_per_method(demo):
    out, rows, _ = demo
    assert [r["method"] for r in rows] == list(DEMO_METHODS)
    for key in DEMO_METHODS:
        result = json.loads((out / key / "result.json").read_text())
        assert result["method"] == DEMO_METHODS[key][1]["method"]
        assert result["steps"] == STEPS
        assert result["config"]["seed"] == 1


def test_rows_and_table(demo):
    _, rows, printed = demo
    for r in rows:
        assert set(r) == {"method", "label", "sparsity", "test_accuracy", "seconds", "steps"}
        assert 0 <= r["test_accuracy"] <= 1 and r["seconds"] > 0 and r["steps"] == STEPS
        expected = 0.0 if r["method"] == "dense" else 0.8
        assert r["sparsity"] == pytest.approx(expected, abs=0.01)
    table = printed[0]
    assert table == format_table(rows)
    assert table.splitlines()[0].split() == ["method", "sparsity", "test", "accuracy",
                                             "seconds"]
    assert len(table.splitlines()) == 2 + len(rows)
    for r in rows:
        assert r["label"] in table
    assert "demo.json" in printed[1] and "demo.png" in printed[1]


def test_demo_json_and_png(demo):
    out, rows, _ = demo
    summary = json.loads((out / "demo.json").read_text())
    assert summary["rows"] == rows
    assert (summary["dataset"], summary["sparsity"], summary["seed"]) == ("mnist1d", 0.8, 1)
    assert summary["total_seconds"] > 0
    assert summary["provenance"] == json.loads(json.dumps(provenance()))  # the commit it ran at
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_is_refused_without_overwrite(capsys, demo):
    out, _, _ = demo
    fails(capsys, ["demo", "--out", out], str(out), "already holds a demo run",
          "--overwrite")


@pytest.mark.parametrize(("argv", "message"), [
    (["--sparsity", "1.0"], "--sparsity must lie in (0, 1)"),
    (["--sparsity", "0"], "--sparsity must lie in (0, 1)"),
    (["--seed", "-1"], "--seed"),
])
def test_bad_flags_fail_before_training(capsys, tmp_path, argv, message):
    fails(capsys, ["demo", "--out", tmp_path / "d", *argv], message)
    assert not (tmp_path / "d").exists()


def test_cli_parses_demo(capsys):
    parser = build_parser()[0]
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out OUT", "--sparsity SPARSITY", "--seed SEED", "--overwrite",
                 "--no-progress"):
        assert flag in text
    args = parser.parse_args(["demo", "--sparsity", "0.8", "--seed", "3", "--overwrite"])
    assert (args.out, args.sparsity, args.seed, args.overwrite, args.progress) == (
        "runs/demo", 0.8, 3, True, True)
