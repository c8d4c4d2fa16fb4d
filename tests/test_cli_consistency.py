"""The CLI's flags mean the same in every subcommand (issue #21): ``--out`` is the run
folder of every subcommand that writes one, ``--output``/``-o`` the file of those that
write one file; ``sparsejax plot`` draws a lottery run folder; a missing optional extra
and a missing MNIST folder of the experiments are one line, not a traceback."""

import json
import sys
from pathlib import Path

import pytest
from cli_checks import fails

from sparsejax.harness.cli import build_parser, main
from sparsejax.harness.plotting import load_results

REPO = Path(__file__).resolve().parent.parent
FOLDER_WRITERS = ("train", "lottery", "instability")  # --out: the run folder
FILE_WRITERS = ("plot", "export-ticket")  # --output / -o: the file
TINY_LOTTERY = ["lottery", "--steps", "10", "--rounds", "1", "--controls", "reinit",
                "--batch-size", "60"]


def _help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        build_parser()[0].parse_args([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", FOLDER_WRITERS)
def test_folder_writers_take_out(capsys, command):
    assert "--out OUT" in _help(capsys, command)
    args = build_parser()[0].parse_args([command, "--steps", "1", "--out", "somewhere"])
    assert args.out == "somewhere"


@pytest.mark.parametrize("command", FILE_WRITERS)
def test_file_writers_take_output(capsys, command):
    text = _help(capsys, command)
    assert "--output OUTPUT, -o OUTPUT" in text
    assert "--out " not in text


def test_lottery_keeps_out_root_and_refuses_both(capsys):
    parser = build_parser()[0]
    args = parser.parse_args(["lottery", "--steps", "1", "--out-root", "runs/x"])
    assert (args.out, args.out_root) == (None, "runs/x")
    with pytest.raises(SystemExit):
        parser.parse_args(["lottery", "--steps", "1", "--out", "a", "--out-root", "b"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.fixture(scope="module")
def lottery_run(tmp_path_factory):
    """One tiny lottery run (mnist1d, 10 steps a round, round 1 with the reinit control)
    written with ``--out``, shared by the tests below."""
    folder = tmp_path_factory.mktemp("lottery") / "run"
    assert main([*TINY_LOTTERY, "--out", str(folder)]) == 0
    return folder


def test_lottery_out_is_the_run_folder(lottery_run):
    summary = json.loads((lottery_run / "summary.json").read_text())
    assert Path(summary["folder"]) == lottery_run
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for branch in ("round_00/ticket", "round_01/ticket", "round_01/reinit"):
        assert (lottery_run / branch / "result.json").exists()


def test_lottery_out_reused_with_other_settings_is_refused(capsys, lottery_run):
    fails(capsys, [*TINY_LOTTERY[:2], "12", *TINY_LOTTERY[3:], "--out", lottery_run],
          str(lottery_run), "holds a lottery run with other settings (steps)")


def test_plot_draws_a_lottery_folder(capsys, lottery_run, tmp_path):
    results = load_results([lottery_run])
    labels = sorted({r["method"] for r in results})
    assert labels == ["IMP ticket", "control: reinit"]
    assert sorted(r["round"] for r in results if r["method"] == "IMP ticket") == [0, 1]
    png = tmp_path / "lottery.png"
    assert main(["plot", str(lottery_run), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_plot_skips_instability_copies(lottery_run, tmp_path):
    import shutil
    folder = tmp_path / "run"
    shutil.copytree(lottery_run, folder, ignore=shutil.ignore_patterns("checkpoints"))
    copy = folder / "instability" / "round_00_seeds_101_102" / "copy_101"
    copy.mkdir(parents=True)
    (copy / "result.json").write_text(json.dumps({"test_accuracy": 0.5, "sparsity": 0.0}))
    assert len(load_results([folder])) == len(load_results([lottery_run]))


def test_plot_on_a_folder_with_neither_kind(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, ["plot", empty, "-o", tmp_path / "p.png"],
          f"nothing to plot in {empty}", "sparsejax train", "sparsejax lottery")
    other = tmp_path / "other"
    other.mkdir()
    (other / "result.json").write_text(json.dumps({"accuracy": 1.0}))
    fails(capsys, ["plot", other, "-o", tmp_path / "p.png"],
          "is not a sparsejax result: missing", "expected", "sparsejax lottery")
    assert not (tmp_path / "p.png").exists()


def test_missing_matplotlib_is_one_line(capsys, monkeypatch, lottery_run, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    fails(capsys, ["plot", lottery_run, "-o", tmp_path / "p.png"],
          "needs the optional package 'matplotlib'", "pip install 'sparsejax[plots]'")


# --------------------------------------------------------------- experiments' MNIST folder


@pytest.fixture
def strong_common(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import strong_common
    return strong_common


def test_experiments_default_mnist_is_beside_the_checkout(strong_common):
    assert strong_common.DEFAULT_MNIST == REPO.parent / "shared" / "data" / "mnist"


def test_missing_mnist_is_one_line_naming_the_path(strong_common, monkeypatch, tmp_path):
    missing = tmp_path / "no_mnist"
    monkeypatch.delenv("SPARSEJAX_MNIST", raising=False)
    monkeypatch.setattr(strong_common, "DEFAULT_MNIST", missing)
    with pytest.raises(SystemExit) as exit_:
        strong_common.mnist_dir()
    message = str(exit_.value.code)
    assert "\n" not in message
    assert str(missing) in message and "SPARSEJAX_MNIST=" in message
    assert strong_common.mnist_dir(check=False) == str(missing)
    monkeypatch.setenv("SPARSEJAX_MNIST", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit, match="SPARSEJAX_MNIST points at .*elsewhere"):
        strong_common.mnist_dir()
    monkeypatch.setenv("SPARSEJAX_MNIST", str(tmp_path))
    assert strong_common.mnist_dir() == str(tmp_path)


def test_no_machine_paths_in_experiments_or_benchmarks():
    for folder in ("experiments", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            for machine in ('"/work/', "'/work/", '"/home/', "'/home/"):
                assert machine not in text, f"{path.relative_to(REPO)} holds {machine}..."
