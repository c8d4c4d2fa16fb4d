"""--resume continues only the same run, nothing in --out is destroyed without
--overwrite, and --nonfinite skip runs that skipped too much fail (docs/reliability.md)."""

import json

import numpy as np
from cli_checks import fails

import sparsejax.harness.training.loop as loop
from sparsejax.harness.cli import main


def run_args(out, *extra):
    return ["train", "--steps", "4", "--batch-size", "64", "--checkpoint-every", "2",
            "--no-progress", "--no-tensorboard", "--out", str(out), *extra]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_resume_rejects_a_changed_configuration_or_fewer_steps_and_continues_longer(
        tmp_path, capsys):
    # one run for both checks: the refusals leave it as it was, then it is extended
    out = tmp_path / "run"
    assert main(run_args(out, "--method", "static", "--sparsity", "0.9")) == 0
    assert json.loads((out / "config.json").read_text())["config"]["sparsity"] == 0.9
    before = snapshot(out)
    fails(capsys, run_args(out, "--method", "static", "--sparsity", "0.5", "--resume"),
          "--sparsity was 0.9, now 0.5")
    fails(capsys, run_args(out, "--method", "rigl", "--sparsity", "0.9", "--resume"),
          "--method was 'static', now 'rigl'")
    # static's recipe sets lr 0.2 (RigL's MNIST setup), so 0.3 is a change
    line = fails(capsys, run_args(out, "--method", "static", "--sparsity", "0.5", "--lr",
                                  "0.3", "--resume"), "--sparsity", "--lr was 0.2, now 0.3")
    assert "--log-every" not in line
    fails(capsys, [*run_args(out, "--method", "static", "--sparsity", "0.9", "--resume"),
                   "--steps", "2"], "--steps 2", "step 4")
    assert snapshot(out) == before
    # a longer run, with other logging options, continues from the step-4 checkpoint
    assert main([*run_args(out, "--method", "static", "--sparsity", "0.9", "--resume",
                           "--log-every", "1"), "--steps", "6"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 6 and result["resumed_from_step"] == 4
    assert result["extended_from_steps"] == 4 and result["config"]["steps"] == 6
    assert result["failed"] is None


def test_resume_with_every_checkpoint_corrupt_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(out)) == 0
    for step_dir in (out / "checkpoints").glob("step_*"):
        victim = max((p for p in step_dir.rglob("*") if p.is_file()
                      and p.name != "MANIFEST.json"), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = snapshot(out)
    fails(capsys, run_args(out, "--resume"), "no good checkpoint", "nothing was changed")
    assert snapshot(out) == before


def test_fresh_run_into_a_run_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*run_args(out), "--steps", "6"]) == 0
    before = snapshot(out)
    fails(capsys, run_args(out), "already holds a run", "--overwrite", "--resume")
    assert snapshot(out) == before
    assert main(run_args(out, "--overwrite")) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 4 and result["resumed_from_step"] == 0
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert steps == ["step_00000002", "step_00000004"]  # step 6 of the old run is gone
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lines) == 4


def nan_at(monkeypatch, bad_steps):
    """Make the training batches of ``bad_steps`` (1-based) hold a NaN."""
    original = loop.train_batches

    def corrupted(*args, **kwargs):
        for i, (position, batch) in enumerate(original(*args, **kwargs)):
            if i + 1 in bad_steps:
                batch = {**batch, "image": batch["image"].copy()}
                batch["image"][0, 0] = np.nan
            yield position, batch

    monkeypatch.setattr(loop, "train_batches", corrupted)


def test_skip_fails_when_too_many_steps_were_skipped(tmp_path, capsys, monkeypatch):
    nan_at(monkeypatch, {1, 2, 3})
    out = tmp_path / "run"
    fails(capsys, [*run_args(out, "--nonfinite", "skip"), "--steps", "5"],
          "3 of 5 steps (60%)", "--max-skipped-fraction 0.5")
    result = json.loads((out / "result.json").read_text())
    assert result["skipped_nonfinite_steps"] == 3 and result["steps"] == 5
    assert "--max-skipped-fraction" in result["failed"]
    # a higher threshold lets the same run pass
    assert main([*run_args(out, "--nonfinite", "skip", "--overwrite",
                           "--max-skipped-fraction", "0.6"), "--steps", "5"]) == 0


def test_skip_fails_when_the_final_loss_is_not_finite(tmp_path, capsys, monkeypatch):
    nan_at(monkeypatch, {4})
    out = tmp_path / "run"
    fails(capsys, run_args(out, "--nonfinite", "skip"), "non-finite training loss",
          "last step (4)")
    result = json.loads((out / "result.json").read_text())
    assert result["skipped_nonfinite_steps"] == 1 and "non-finite" in result["failed"]


def test_nonfinite_error_does_not_promise_a_checkpoint_it_has_not_written(
        tmp_path, capsys, monkeypatch):
    nan_at(monkeypatch, {1})
    line = fails(capsys, run_args(tmp_path / "a"), "at step 1",
                 "no checkpoint was written before it")
    assert "is kept" not in line
    monkeypatch.undo()
    nan_at(monkeypatch, {3})  # after the step-2 checkpoint
    fails(capsys, run_args(tmp_path / "b"), "at step 3",
          "the last good checkpoint, step 2, is kept")


def test_bad_max_skipped_fraction_and_resume_with_overwrite(tmp_path, capsys):
    fails(capsys, run_args(tmp_path / "run", "--max-skipped-fraction", "1.5"),
          "--max-skipped-fraction must lie in [0, 1], got 1.5")
    fails(capsys, run_args(tmp_path / "run", "--resume", "--overwrite"),
          "--resume and --overwrite")
    assert not (tmp_path / "run").exists()


def test_a_second_process_on_the_same_out_fails_at_once(tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as other:  # another process training into out
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails(capsys, run_args(out, "--method", "static", "--sparsity", "0.9"),
              "is in use by another sparsejax process")
        assert not (out / "metrics.jsonl").exists()
        fcntl.flock(other, fcntl.LOCK_UN)
    assert main(run_args(out, "--method", "static", "--sparsity", "0.9")) == 0


def _write_mnist(folder, seed, n_train=128, n_test=32):
    """Tiny MNIST IDX files with random pixels and labels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, magic, shape, high in (("images-idx3", 2051, (n, 28, 28), 256),
                                         ("labels-idx1", 2049, (n,), 10)):
            header = magic.to_bytes(4, "big") + b"".join(k.to_bytes(4, "big") for k in shape)
            body = rng.integers(0, high, size=shape, dtype=np.uint8).tobytes()
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(header + body)


def test_resume_checks_the_checkpoints_own_config_and_data(tmp_path, capsys):
    out = tmp_path / "run"
    _write_mnist(tmp_path / "a", seed=0)
    _write_mnist(tmp_path / "b", seed=1)
    data_a = ["--dataset", "mnist", "--data-dir", str(tmp_path / "a")]
    assert main(run_args(out, "--method", "static", "--sparsity", "0.5", *data_a)) == 0
    before = snapshot(out)
    # Other data under the same options (the data folder may move on a resume).
    fails(capsys, run_args(out, "--method", "static", "--sparsity", "0.5", "--steps", "6",
                           "--resume", "--dataset", "mnist", "--data-dir",
                           str(tmp_path / "b")),
          "--resume: the data differs from what the checkpoint at step 4",
          "sample_sha256 was")
    assert snapshot(out) == before
    # A config.json edited by hand: the checkpoint's own record still refuses.
    config = json.loads((out / "config.json").read_text())
    config["config"]["sparsity"] = 0.8
    (out / "config.json").write_text(json.dumps(config))
    fails(capsys, run_args(out, "--method", "static", "--sparsity", "0.8", "--steps", "6",
                           "--resume", *data_a),
          "the checkpoint at step 4", "--sparsity was 0.5, now 0.8", "edited?")
    # The same data and options resume.
    config["config"]["sparsity"] = 0.5
    (out / "config.json").write_text(json.dumps(config))
    assert main(run_args(out, "--method", "static", "--sparsity", "0.5", "--steps", "6",
                         "--resume", *data_a)) == 0


def test_prune_finds_a_runs_moved_data_with_data_dir(tmp_path, capsys):
    _write_mnist(tmp_path / "a", seed=0)
    out = tmp_path / "run"
    assert main(run_args(out, "--dataset", "mnist", "--data-dir", str(tmp_path / "a"))) == 0
    (tmp_path / "a").rename(tmp_path / "moved")
    prune = ["prune", str(out), "--method", "magnitude", "--sparsity", "0.5",
             "--calibration-examples", "16"]
    fails(capsys, prune, "pass --data-dir")
    assert main([*prune, "--data-dir", str(tmp_path / "moved")]) == 0


def test_resuming_a_finished_run_changes_nothing_unless_its_result_was_cut(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(out)) == 0
    before = snapshot(out)
    assert main(run_args(out, "--resume")) == 0
    assert "nothing to train, result.json unchanged" in capsys.readouterr().err
    assert snapshot(out) == before
    # the same finished run (unchanged, as just checked), its result.json then cut short
    (out / "result.json").write_bytes(b"")  # a write cut short (older versions)
    assert main(run_args(out, "--resume")) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == 4
