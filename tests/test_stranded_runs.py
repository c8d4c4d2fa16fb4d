"""No run is ever stranded (docs/reliability.md): a torn or garbage end of metrics.jsonl
is cut back on --resume with a warning naming the file; a full disk ends a run with one
line naming the file and the step saved, leaving no half line, 0-byte or .tmp file; and
a run SIGKILLed at any point of its metrics, config and result writes resumes to the
result of an uninterrupted run."""

import errno
import json
import os
import random
import shutil
import signal

import pytest
from cli_checks import fails
from stop_checks import (
    STEPS,
    Patched,
    assert_same_run,
    finish,
    reference_run,
    run_args,
    start_child,
)

import sparsejax.harness.training.run_output as run_output
import sparsejax.io.checkpoint as checkpoint
import sparsejax.io.files as files
from sparsejax.harness.cli import main
from sparsejax.harness.training.run_output import MetricsLog, repair_metrics
from sparsejax.io.files import write_atomic


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def lines(*steps):
    return "".join(json.dumps({"loss": 1.0, "step": s}) + "\n" for s in steps)


# ---------------------------------------------------------------- the metrics log itself

@pytest.mark.parametrize("tail, problem", [
    ('{"loss": 0.5, "st', "line 4 is cut short"),
    ('{"loss": 0.5, "step": 4}\n\x00\x00\x00\x00', "line 5 is cut short"),
    ("garbage\n", "line 4 is not a JSON record (Expecting value"),
    ("[1, 2]\n", "line 4 is not a metrics record"),
    ('{"step": 4}\n???\n' + lines(5, 6), "line 5 is not a JSON record"),  # after step 4
])
def test_a_damaged_end_is_cut_back_with_a_warning(tmp_path, caplog, tail, problem):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines(1, 2, 3) + tail)
    with caplog.at_level("WARNING"):
        repair = repair_metrics(path, keep_through=3)
    assert path.read_text() == lines(1, 2, 3)
    [warning] = [r.getMessage() for r in caplog.records]
    assert str(path) in warning and problem in warning and "cut the file back" in warning
    assert f"{repair.dropped_bytes} bytes dropped" in warning
    assert repair.kept_lines == 3 and repair.bad_lines >= 1


def test_records_after_the_checkpoint_are_dropped_without_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines(1, 2) + "\n" + lines(3, 4))  # a blank line is no damage
    with caplog.at_level("WARNING"):
        repair_metrics(path, keep_through=3)
    assert path.read_text() == lines(1, 2) + "\n" + lines(3) and not caplog.records
    path.write_text(lines(3, 1, 2))  # out of order (edited by hand): the kept ones rewritten
    repair_metrics(path, keep_through=2)
    assert path.read_text() == lines(1, 2)


def test_a_bad_line_before_records_up_to_the_checkpoint_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines(1) + "garbage\n" + lines(2, 3))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record .*"
                                         r"line 3 after it is a good record of step 2.*"
                                         r"Nothing was changed: delete line 2"):
        repair_metrics(path, keep_through=2)
    assert path.read_bytes() == before


def test_a_failed_metrics_write_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, resume_step=0, tensorboard=False)
    log.write({"step": 1, "loss": 2.0})

    def half_then_full(fd, data):  # a filling disk: a short write, then ENOSPC
        if len(data) > 10:
            return os.write(fd, bytes(data)[:10])
        no_space()

    monkeypatch.setattr(run_output, "os", Patched(os, write=half_then_full))
    with pytest.raises(OSError, match=r"No space left on device: '.*metrics.jsonl'"):
        log.write({"step": 2, "loss": 1.0})
    monkeypatch.undo()
    log.write({"step": 3, "loss": 0.5})  # the file goes on from the last whole line
    log.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 3]


def test_an_atomic_write_that_fails_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("old")
    monkeypatch.setattr(files, "os", Patched(os, fsync=no_space))
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: '.*result.json'"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]


# ---------------------------------------------------------------- the CLI, in process

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory)


def crashed_copy(reference, tmp_path, after_step):
    """``reference`` as a crash right after ``after_step`` would leave it: the checkpoints
    after it, result.json and the metrics lines after it gone."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "result.json").unlink()
    for step_dir in (out / "checkpoints").glob("step_*"):
        if int(step_dir.name.split("_")[1]) > after_step:
            shutil.rmtree(step_dir)
    metrics = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(metrics[:after_step]))
    return out


@pytest.mark.parametrize("tail", ['{"accuracy": 0.1, "loss": 2.3, "penalty": 0.0, "st',
                                  "not json\n", "\x00" * 64])
def test_resume_cuts_a_torn_or_garbage_last_line_and_finishes(reference, tmp_path, caplog,
                                                              tail):
    out = crashed_copy(reference, tmp_path, after_step=3)  # checkpoint 2, metrics to 3
    with (out / "metrics.jsonl").open("a") as f:
        f.write(tail)
    with caplog.at_level("WARNING", logger="sparsejax.harness.training.run_output"):
        assert main(run_args(out, "--resume")) == 0
    [warning] = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert f"{out / 'metrics.jsonl'}: line 4 " in warning and "bytes dropped" in warning
    assert_same_run(out, reference)


def test_resume_refuses_a_garbage_line_in_the_middle(reference, tmp_path, capsys):
    out = crashed_copy(reference, tmp_path, after_step=3)
    metrics = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(metrics[0] + "garbage\n" + "".join(metrics[1:]))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fails(capsys, run_args(out, "--resume"), str(out / "metrics.jsonl"), "line 2",
          "Nothing was changed: delete line 2")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_full_disk_mid_run_ends_with_one_line_and_resumes(reference, tmp_path, capsys,
                                                          monkeypatch):
    """The disk fills after the step-2 checkpoint: the background save of step 4 fails
    (orbax carries on), then the metrics line of step 5 cannot be written."""
    out = tmp_path / "run"
    real_manifest = checkpoint._write_manifest

    def manifest(folder, step):
        if step == 4:
            no_space()
        real_manifest(folder, step)

    def write(fd, data):
        if b'"step": 5' in bytes(data):
            no_space()
        return os.write(fd, data)

    monkeypatch.setattr(checkpoint, "_write_manifest", manifest)
    monkeypatch.setattr(run_output, "os", Patched(os, write=write))
    line = fails(capsys, run_args(out),
                 f"error: cannot write {out / 'metrics.jsonl'} ([Errno 28] No space left",
                 "the save of step 4", "after step 5 of 6",
                 f"step 2 is saved in {out / 'checkpoints'}",
                 "free space on that disk, then resume with: sparsejax train --steps 6")
    assert line.endswith("--resume") and "--overwrite" not in line
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # whole lines only
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    assert main(run_args(out, "--resume")) == 0
    assert_same_run(out, reference)


@pytest.mark.parametrize("name", ["config.json", "result.json"])
def test_full_disk_writing_config_or_result_leaves_no_tmp(reference, tmp_path, capsys,
                                                          monkeypatch, name):
    out = tmp_path / "run"

    def replace(src, dst):
        if dst.name == name:
            no_space()
        os.replace(src, dst)

    monkeypatch.setattr(files, "os", Patched(os, replace=replace))
    saved = "no checkpoint was saved yet" if name == "config.json" else "step 6 is saved"
    line = fails(capsys, run_args(out), f"cannot write {out / name}", saved,
                 "then resume with: sparsejax train")
    assert "--overwrite" not in line
    assert not (out / name).exists() and not list(out.rglob("*.tmp"))
    if name == "config.json":  # nothing trained: no empty metrics.jsonl either
        assert not (out / "metrics.jsonl").exists()
    monkeypatch.undo()
    assert main(run_args(out, "--resume")) == 0
    assert_same_run(out, reference)


def test_empty_files_left_by_an_older_version_do_not_block_a_rerun(reference, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text("")  # a write that failed on a full disk, before
    (out / "metrics.jsonl").write_text("")
    assert main(run_args(out)) == 0  # no "already holds a run; pass --overwrite"
    assert_same_run(out, reference)


# ---------------------------------------------------------------- SIGKILL at a write

def kill_and_resume(out, reference, point):
    """SIGKILL a child run at ``point`` (``FILE:N:PHASE``, tests/slow_cli.py), then resume
    it in process: it ends with the reference's result and metrics."""
    code, _, err = finish(start_child(run_args(out), SPARSEJAX_TEST_KILL=point))
    assert code == -signal.SIGKILL, err
    assert not (out / "result.json").exists()
    name, _, phase = point.split(":")
    if phase == "torn":  # the kill left half a line, or half a .tmp file
        torn = out / name if name == "metrics.jsonl" else out / (name + ".tmp")
        assert not torn.read_bytes().endswith(b"\n"), torn.read_bytes()
    assert main(run_args(out, "--resume")) == 0, point
    assert_same_run(out, reference)


@pytest.mark.parametrize("point", ["metrics.jsonl:3:torn", "result.json:1:after"])
def test_killed_during_a_metrics_or_result_write_resumes(reference, tmp_path, point):
    kill_and_resume(tmp_path / "run", reference, point)


def _kill_points(count, seed=34):
    """``count`` distinct random kill points over every metrics, config and result write
    of a run of stop_checks.STEPS steps."""
    points = [f"metrics.jsonl:{n}:{phase}" for n in range(1, STEPS + 1)
              for phase in ("before", "torn", "after")]
    points += [f"{name}:1:{phase}" for name in ("config.json", "result.json")
               for phase in ("before", "torn", "after")]
    return random.Random(seed).sample(points, count)


@pytest.mark.slow  # 20 child processes, 100 s on 2 cores
@pytest.mark.parametrize("point", _kill_points(20))
def test_killed_at_random_writes_resumes_to_the_same_result(reference, tmp_path, point):
    kill_and_resume(tmp_path / "run", reference, point)


@pytest.mark.parametrize("command", ["export-ticket", "prune"])
def test_full_disk_under_export_ticket_and_prune_leaves_nothing_to_trip_on(
        reference, tmp_path, capsys, monkeypatch, command):
    """They left a 0-byte result.json (which then refused a rerun: 'exists; pass
    --overwrite') or a t.npz.tmp, after an OSError traceback."""
    if command == "export-ticket":  # a ticket needs a method that freezes the weights
        run = tmp_path / "strong"
        assert main(run_args(run, "--method", "edge_popup", "--sparsity", "0.5", steps=2)) == 0
        target = tmp_path / "t.npz"
        argv = ["export-ticket", run, "-o", target]
    else:
        target = tmp_path / "prune" / "result.json"
        argv = ["prune", "--method", "magnitude", "--sparsity", "0.5", reference,
                "--out", target.parent]

    def replace(src, dst):
        if dst.name == target.name:
            no_space()
        os.replace(src, dst)

    monkeypatch.setattr(files, "os", Patched(os, replace=replace))
    fails(capsys, argv, f"[Errno 28] No space left on device: '{target}'")
    assert not target.exists() and not list(target.parent.glob("*.tmp"))
    monkeypatch.undo()
    assert main([str(a) for a in argv]) == 0  # the rerun is not refused
    assert target.stat().st_size > 0
