"""Bad input to the CLI and the loaders: a one-line error that names the flag or file and
the problem, exit code 2 and no traceback. Every case fails before training or
compiling starts (see docs/reliability.md)."""

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import optax
import pytest
from cli_checks import fails

from sparsejax.core.schedules import cubic_sparsity
from sparsejax.harness.cli import build_parser, main
from sparsejax.harness.data import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, load_dataset
from sparsejax.harness.launch import launch
from sparsejax.harness.training.loop import TrainConfig, build_method
from sparsejax.io.tickets import TICKET_FORMAT, TICKET_VERSION
from sparsejax.methods.dst import rigl, snfs, sparse_evolutionary
from sparsejax.methods.pruning import gradual_magnitude


def train_args(tmp_path, *extra):
    return ["train", "--steps", "1", "--no-progress", "--no-tensorboard",
            "--out", tmp_path / "run", *extra]


@pytest.mark.parametrize("flags, expected", [
    (["--log-every", "0"], "--log-every must be an integer >= 1, got 0"),
    (["--eval-every", "-1"], "--eval-every must be an integer >= 0, got -1"),
    (["--seed", "18446744073709551616"], "--seed must be an integer in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (["--init-batches", "-1"], "--init-batches must be an integer >= 0, got -1"),
    (["--momentum", "nan"], "--momentum must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--method", "static", "--sparsity", "90"], "--sparsity must lie in [0, 1), got 90.0"),
])
def test_bad_train_flags_name_the_flag(capsys, tmp_path, flags, expected):
    fails(capsys, train_args(tmp_path, *flags), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, option", [
    (["--sparsity", "0.5", "--method-option", "sparsity=0.7"], "--method-option sparsity=0.7"),
    (["--sparsity", "0.5", "--distribution", "erk", "--method-option", "distribution=uniform"],
     "--method-option distribution=uniform"),
])
def test_a_method_option_beside_its_flag_is_refused(capsys, tmp_path, flags, option):
    """--method-option sparsity=0.7 beside --sparsity 0.5 was ignored (0.5 trained)."""
    flag = option.split()[1].split("=")[0]
    fails(capsys, train_args(tmp_path, "--method", "static", *flags), option, f"--{flag} ",
          f"give it once, with --{flag}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, dataset, expected", [
    ("lenet300", "tinyshakespeare", "models that take text: gpt"),
    ("conv2", "tinyshakespeare", "models that take text: gpt"),
    ("gpt", "mnist1d", "takes text"),
])
def test_a_model_that_cannot_take_the_dataset_is_refused(capsys, tmp_path, model, dataset,
                                                        expected):
    """lenet300 on tinyshakespeare failed inside JAX ('indices and arr must have the same
    number of dimensions')."""
    fails(capsys, train_args(tmp_path, "--model", model, "--dataset", dataset),
          f"model {model!r}", f"dataset {dataset!r}", expected)
    assert not (tmp_path / "run").exists()


def test_out_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    fails(capsys, ["train", "--steps", "1", "--out", tmp_path / "file" / "run"],
          "--out", "is a file, not a folder", str(tmp_path / "file"))


def test_read_only_out(capsys, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("permissions are not enforced here (running as root)")
        fails(capsys, ["train", "--steps", "1", "--out", folder], "--out", "not writable")
        fails(capsys, ["train", "--steps", "1", "--out", folder / "run"], "--out",
              "cannot be created", "permission denied")
    finally:
        folder.chmod(0o755)


def test_data_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    fails(capsys, train_args(tmp_path, "--dataset", "mnist", "--data-dir", tmp_path / "file"),
          "--data-dir", "is a file, not a folder")


def _write_idx(path, magic, shape):
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)
    path.write_bytes(header + bytes(int(np.prod(shape))))


def test_idx_files_with_no_examples(capsys, tmp_path):
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", IDX_IMAGES_MAGIC, (0, 28, 28))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", IDX_LABELS_MAGIC, (0,))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: holds 0 train examples"):
        load_dataset("mnist", tmp_path)
    fails(capsys, train_args(tmp_path, "--dataset", "mnist", "--data-dir", tmp_path),
          "train-images-idx3-ubyte", "holds 0 train examples")


def test_method_options_of_the_wrong_kind():
    with pytest.raises(ValueError, match="prunable must be a filter function.*got 5"):
        build_method(TrainConfig(method="static", sparsity=0.5,
                                 method_options={"prunable": 5}), optax.sgd(0.1))


def test_update_every_and_frequency_must_be_integers(capsys, tmp_path):
    sgd = optax.sgd(0.1)
    wanted = "update_every (steps) must be an integer >= 1, got "
    for bad in (2.5, True):
        with pytest.raises(TypeError, match=wanted.replace("(", r"\(").replace(")", r"\)")):
            sparse_evolutionary(sgd, sparsity=0.5, update_every=bad)
        with pytest.raises(TypeError, match="update_every"):
            rigl(sgd, sparsity=0.5, total_steps=10, update_every=bad)
        with pytest.raises(TypeError, match="update_every"):
            snfs(sgd, sparsity=0.5, total_steps=10, update_every=bad)
        with pytest.raises(TypeError, match="frequency .steps. must be an integer >= 1"):
            gradual_magnitude(sgd, sparsity=0.5, total_steps=10, frequency=bad)
        with pytest.raises(TypeError, match="frequency"):
            cubic_sparsity(0.5, 0, 10, frequency=bad)
    sparse_evolutionary(sgd, sparsity=0.5, update_every=np.int64(2))  # numpy ints are fine
    fails(capsys, train_args(tmp_path, "--method", "set", "--sparsity", "0.5",
                             "--method-option", "update_every=2.5"), wanted + "2.5")


def test_broken_result_file_is_named(capsys, tmp_path):
    (tmp_path / "result.json").write_text("{broken")
    fails(capsys, ["plot", tmp_path, "-o", tmp_path / "p.png"],
          str(tmp_path / "result.json"), "is not valid JSON")


@pytest.mark.parametrize("text", ['{"config": {"method": "dense", "mod', "not json", "[1, 2]", ""])
@pytest.mark.parametrize("command", [["prune", "--method", "magnitude", "--sparsity", "0.5"],
                                     ["export-ticket"], ["plot"]])
def test_a_broken_result_json_is_named_by_every_reader(capsys, tmp_path, command, text):
    (tmp_path / "result.json").write_text(text)
    argv = [command[0], tmp_path, *command[1:]]
    if command[0] == "plot":
        argv += ["-o", tmp_path / "p.png"]
    line = fails(capsys, argv, str(tmp_path / "result.json"))
    assert "not valid JSON (line 1 column" in line or "is empty" in line or \
        "not a JSON object" in line, line


@pytest.mark.parametrize("command", [["prune", "--method", "magnitude", "--sparsity", "0.5"],
                                     ["export-ticket"]])
def test_a_run_whose_data_moved_gets_advice_the_command_takes(capsys, tmp_path, command):
    """The advice was 'pass data_dir (CLI: --data-dir)', a flag neither command had; both
    take --data-dir now, and the advice names it and the folder looked in."""
    gone = tmp_path / "moved_away"
    config = dataclasses.asdict(TrainConfig(method="dense", dataset="mnist", steps=1,
                                            data_dir=str(gone)))
    (tmp_path / "result.json").write_text(json.dumps({"config": config}))
    fails(capsys, [command[0], tmp_path, *command[1:]], "'mnist'", str(gone),
          "pass --data-dir")
    elsewhere = tmp_path / "elsewhere"
    fails(capsys, [command[0], tmp_path, *command[1:], "--data-dir", elsewhere],
          f"is not in {elsewhere}", "pass --data-dir")


def _ticket(path, header, **arrays):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    np.savez(path, header=np.frombuffer(raw, np.uint8), **arrays)
    return path


FULL_HEADER = {"format": TICKET_FORMAT, "version": TICKET_VERSION, "config": {},
               "num_classes": 10, "input_shape": [40, 1], "total_steps": 1,
               "batches_per_epoch": 1, "frozen_params_sha256": "", "masks": [{"path": "w"}],
               "effective_params_sha256": "", "model_state": []}


def test_damaged_ticket_files(capsys, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    fails(capsys, ["evaluate-ticket", empty], str(empty), "the file is empty")
    bad_json = _ticket(tmp_path / "json.npz", b"{not json")
    fails(capsys, ["evaluate-ticket", bad_json], str(bad_json), "header is not valid JSON")
    no_key = _ticket(tmp_path / "key.npz",
                     {k: v for k, v in FULL_HEADER.items() if k != "num_classes"})
    fails(capsys, ["evaluate-ticket", no_key], str(no_key), "header lacks 'num_classes'")
    no_mask = _ticket(tmp_path / "mask.npz", FULL_HEADER)
    fails(capsys, ["evaluate-ticket", no_mask], str(no_mask), "lacks the array(s) mask_00000")


@pytest.mark.parametrize("name, content, kind", [
    ("result.json", b'{"method": "dense", "test_accuracy": 0.9}', "it is a JSON file"),
    ("notes.txt", b"some notes", "it is not an .npz archive"),
    ("array.npy", None, "it is an .npy array"),
])
def test_a_file_that_is_not_a_ticket_is_refused_without_numpys_advice(
        capsys, tmp_path, name, content, kind):
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros(3))
    else:
        path.write_bytes(content)
    line = fails(capsys, ["evaluate-ticket", path], str(path), "is not a sparsejax ticket",
                 "written by sparsejax export-ticket", kind)
    assert "allow_pickle" not in line and "pickle" not in line


def test_instability_round_that_was_not_run(capsys, tmp_path):
    fails(capsys, ["instability", "--steps", "1", "--round", "3", "--out-root", tmp_path],
          "--round 3 was not run", "finished rounds []")


def test_every_flag_has_help():
    parser, _ = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name in commands.choices:
        undocumented = [a.option_strings or a.dest for a in commands.choices[name]._actions
                        if not a.help]
        assert not undocumented, f"sparsejax {name}: {undocumented} have no help"


def test_export_ticket_refuses_an_existing_ticket_without_overwrite(capsys, tmp_path):
    """export-ticket -o replaced an existing file silently (train, prune and demo
    refuse); the refusal comes before the run is restored, and --overwrite is a flag."""
    ticket = tmp_path / "t.npz"
    ticket.write_bytes(b"mine")
    fails(capsys, ["export-ticket", tmp_path / "no_run", "-o", ticket],
          f"{ticket} exists; pass --overwrite to replace it, or choose another --output")
    assert ticket.read_bytes() == b"mine"
    (tmp_path / "no_run").mkdir()
    (tmp_path / "no_run" / "ticket.npz").write_bytes(b"mine")  # the default output too
    fails(capsys, ["export-ticket", tmp_path / "no_run"], "exists; pass --overwrite")
    # with --overwrite the file is no obstacle: what stops it now is the missing run
    line = fails(capsys, ["export-ticket", tmp_path / "no_run", "-o", ticket, "--overwrite"])
    assert "--overwrite" not in line and ticket.read_bytes() == b"mine"


@pytest.mark.parametrize("command", ["export-ticket", "lottery"])
def test_output_under_a_file_names_the_path(capsys, tmp_path, command):
    """Was `[Errno 17] File exists` naming neither the flag nor the file in the way."""
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "sub" / "t.npz"
    if command == "export-ticket":
        argv, flag = ["export-ticket", tmp_path / "no_run", "-o", target], "--output"
    else:
        argv, flag = ["lottery", "--steps", "1", "--rounds", "0", "--out", target], "--out"
    fails(capsys, argv, f"{flag} {target} cannot be created: {tmp_path / 'file'} is a file, "
                        "not a folder")


def test_plot_prints_the_path_it_wrote(capsys, tmp_path):
    """`plot -o runs/p` printed 'wrote runs/p' while matplotlib wrote runs/p.png."""
    for sparsity, accuracy in ((0.5, 0.9), (0.9, 0.8)):
        run = tmp_path / f"s{sparsity}"
        run.mkdir()
        (run / "result.json").write_text(json.dumps(
            {"method": "static", "sparsity": sparsity, "test_accuracy": accuracy}))
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'p.png'}"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "p").exists()


def test_a_lock_that_is_a_folder_is_named(capsys, tmp_path):
    """OUT/.lock as a folder was `[Errno 21] Is a directory` (IsADirectoryError)."""
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    fails(capsys, train_args(tmp_path), f"{tmp_path / 'run' / '.lock'} is a folder, not the "
          "lock file", "move that folder away")


@pytest.mark.parametrize("rounds, control_rounds, valid", [
    ("1", ["7"], "takes rounds in [1, 1]"),
    ("3", ["2", "0"], "takes rounds in [1, 3]"),
    ("0", ["1"], "takes no round"),
])
def test_control_rounds_outside_the_run_are_refused(capsys, tmp_path, rounds, control_rounds,
                                                   valid):
    """`lottery --control-rounds 7 --rounds 1` ran no control and ended with exit code 0."""
    line = fails(capsys, ["lottery", "--steps", "1", "--rounds", rounds, "--control-rounds",
                          *control_rounds, "--out", tmp_path / "run"],
                 "--control-rounds", f"--rounds {rounds}", valid)
    assert f"--control-rounds {control_rounds[-1]} names" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--data-seeds", "1", "1"], ["--data-seeds 1 1 are equal", "give two different seeds"]),
    (["--alphas", "0"], ["--alphas must be an integer >= 2", "both ends included", "got 0"]),
    (["--alphas", "1"], ["--alphas must be an integer >= 2", "got 1"]),
])
def test_instability_options_that_measure_nothing(capsys, tmp_path, flags, expected):
    """`--data-seeds 1 1` reported a 0.00 barrier between two identical copies; `--alphas 0`
    was 'max() arg is an empty sequence' after training both copies (1: ZeroDivisionError)."""
    fails(capsys, ["instability", "--steps", "1", "--out", tmp_path / "run", *flags], *expected)
    assert not (tmp_path / "run").exists()


def test_launch_on_a_port_in_use_is_refused_before_any_process_starts(capsys, tmp_path):
    """Process 0 died with SIGSEGV (exit 139) after gRPC's 'Failed to add port to server'."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        marker = tmp_path / "started"
        fails(capsys, ["launch", "-n", "2", "--port", port, "--", sys.executable, "-c",
                       f"open({str(marker)!r}, 'w')"],
              f"--port {port} cannot be listened on", "choose another --port")
        assert not marker.exists()
    fails(capsys, ["launch", "-n", "1", "--port", "70000", "--", "train"],
          "--port must be a TCP port in [1, 65535], got 70000")


def test_launch_warns_when_devices_outnumber_the_cores_many_times(capsys, monkeypatch):
    """A warning (the run goes on) naming -n, --devices-per-process and the cores."""
    import sparsejax.harness.launch

    monkeypatch.setattr(sparsejax.harness.launch.os, "cpu_count", lambda: 2)
    assert launch(2, [sys.executable, "-c", "pass"], devices_per_process=8) == 0
    assert "warning" not in capsys.readouterr().err  # 16 devices on 2 cores: 8 per core
    assert launch(3, [sys.executable, "-c", "pass"], devices_per_process=8) == 0
    err = capsys.readouterr().err
    assert ("sparsejax launch: warning: -n 3 x --devices-per-process 8 = 24 simulated devices "
            "on 2 CPU cores (12 per core, more than 8)") in err, err


def test_a_sparsity_that_empties_layers_is_refused_unless_allowed(capsys, tmp_path):
    argv = ["train", "--steps", "1", "--no-progress", "--no-tensorboard", "--method",
            "static", "--sparsity", "0.999999", "--out", tmp_path / "run"]
    fails(capsys, argv, "keeps no weight in 3 prunable layer(s)", "--allow-empty-layers")
    with pytest.warns(UserWarning, match="keeps no weight"):
        assert main([str(a) for a in argv] + ["--allow-empty-layers"]) == 0


def test_config_conflicts_are_refused_from_python_too(tmp_path):
    from sparsejax.harness.training.loop import train

    with pytest.raises(ValueError, match="model 'lenet300' takes images and dataset "
                                         "'tinyshakespeare' is text"):
        train(TrainConfig(model="lenet300", dataset="tinyshakespeare", out=str(tmp_path)))
    with pytest.raises(ValueError, match="--method-option sparsity=0.7 and --sparsity 0.5"):
        train(TrainConfig(method="static", sparsity=0.5, method_options={"sparsity": 0.7},
                          out=str(tmp_path)))
