"""Clear errors, not tracebacks, where runs and checkpoints meet the outside world: a URL
as a folder, and a checkpoint save that fails (a full disk) under ``sparsejax train``."""

import pytest

import sparsejax.io.checkpoint as checkpoint
from sparsejax.harness.cli import main
from sparsejax.io.checkpoint import Checkpointer


def test_urls_are_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="checkpoint directory gs://bucket/run: only local"):
        Checkpointer("gs://bucket/run")
    assert main(["train", "--steps", "1", "--out", "gs://bucket/run"]) == 2
    assert "--out gs://bucket/run: only local or mounted shared folders" in (
        capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # no gs:/bucket/run made locally


def test_a_failed_save_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    def full_disk(folder, step):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "_write_manifest", full_disk)
    code = main(["train", "--method", "dense", "--steps", "2", "--checkpoint-every", "1",
                 "--batch-size", "32", "--recipe", "none", "--no-progress",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sparsejax train: error: checkpoint: the save of step 1")
    assert "failed: OSError: No space left on device; this stopped the run after step 2 of 2; " \
           "no checkpoint was saved yet" in last and "--overwrite" not in last
    assert last.endswith(f"free space on that disk, then resume with: sparsejax train "
                         f"--method dense --steps 2 --checkpoint-every 1 --batch-size 32 "
                         f"--recipe none --no-progress --out {tmp_path / 'run'} --resume")
