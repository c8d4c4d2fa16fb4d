"""Per-method recipes as defaults (sparsejax.harness.training.recipes): the bare command of each
method resolves to the recipe recorded in docs/results.md, anything given wins, and
result.json says where each value came from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sparsejax.harness.cli import build_parser, main, train_config
from sparsejax.harness.training.loop import TrainConfig
from sparsejax.harness.training.recipes import LIBRARY_DEFAULTS, RECIPES, resolve_recipe
from sparsejax.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent

# The recipes as docs/results.md records them (written out by hand from its sections, not
# read from the module): training fields, model options, method options.
RIGL_MNIST = {"batch_size": 100, "optimizer": "nesterov", "lr": 0.2, "momentum": 0.9,
              "weight_decay": 1e-4, "lr_schedule": "cosine", "epochs": 30}
EDGE_POPUP_MNIST = {"batch_size": 64, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                    "weight_decay": 5e-4, "lr_schedule": "cosine", "epochs": 14}
SGD_WD = {"batch_size": 100, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
          "weight_decay": 5e-4, "lr_schedule": "cosine"}
ADAM20 = {"batch_size": 100, "optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
          "weight_decay": 0.0, "lr_schedule": "cosine", "epochs": 20}
LIBRARY = {"batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
           "weight_decay": 0.0, "lr_schedule": "cosine", "epochs": 1}
NO_BIAS = {"use_bias": False}
GATES_OPTIONS = {"gate": "gaussian", "lam_rate": 2.0, "score_bounds": [-1.0, 1.5],
                 "weight_init": "scaled_signed_constant", "sigma_final": 0.05}

RECORDED = {  # method -> (training, distribution, model options, method options)
    "dense": ({**RIGL_MNIST, "lr": 0.1}, None, {}, {}),
    "static": (RIGL_MNIST, "erk", {}, {}),
    "set": (RIGL_MNIST, "erk", {}, {}),
    "rigl": (RIGL_MNIST, "erk", {}, {}),
    "snfs": (RIGL_MNIST, "erk", {}, {}),
    "edge_popup": (EDGE_POPUP_MNIST, None, NO_BIAS, {"weight_init": "signed_constant"}),
    "biprop": (EDGE_POPUP_MNIST, None, NO_BIAS, {"weight_init": "kaiming_normal"}),
    "gates": ({"batch_size": 128, "optimizer": "adam", "lr": 0.05, "momentum": 0.9,
               "weight_decay": 0.0, "lr_schedule": "cosine", "epochs": 40}, None, NO_BIAS,
              GATES_OPTIONS),
    "snip": ({**SGD_WD, "epochs": 400}, None, {}, {}),
    "grasp": ({**SGD_WD, "epochs": 100}, None, {}, {}),
    "synflow": ({**SGD_WD, "epochs": 100}, None, {}, {}),
    "random_prune": (ADAM20, None, {}, {}),
    "magnitude": (ADAM20, None, {}, {}),
    # no result recorded here: library defaults
    "gradual_magnitude": (LIBRARY, None, {}, {}),
    "supermask_weights": (LIBRARY, None, {}, {}),
    "ste_magnitude": ({**RIGL_MNIST, "lr": 0.1}, "erk", {}, {}),
    "sr_ste": ({**RIGL_MNIST, "lr": 0.1}, "erk", {}, {}),
    "ste_random": (LIBRARY, None, {}, {}),
}


def bare(argv: list[str]) -> TrainConfig:
    """The TrainConfig that ``sparsejax train ARGV`` runs, before resolution."""
    parser, _ = build_parser()
    return train_config(parser.parse_args(["train", *argv]))


def test_every_registered_method_has_a_recorded_row():
    assert set(RECORDED) == set(METHODS)


@pytest.mark.parametrize("method", sorted(RECORDED))
def test_the_bare_command_resolves_to_the_recorded_recipe(method):
    training, distribution, model_options, method_options = RECORDED[method]
    argv = ["--method", method, "--dataset", "mnist"]
    if method != "dense":
        argv += ["--sparsity", "0.9"]
    config, sources = resolve_recipe(bare(argv))
    assert {k: getattr(config, k) for k in training} == training
    assert config.distribution == distribution
    assert config.model_options == model_options
    assert config.method_options == method_options
    assert config.steps is None
    recorded = method not in ("gradual_magnitude", "supermask_weights", "ste_random")
    for key in (*training, *(f"model_options.{k}" for k in model_options),
                *(f"method_options.{k}" for k in method_options)):
        assert sources[key] == (f"recipe {method}/mlp" if recorded else "default"), key


def test_given_values_win_field_by_field_and_option_by_option():
    config, sources = resolve_recipe(bare([
        "--method", "gates", "--sparsity", "0.8", "--lr", "0.02", "--steps", "7",
        "--model-option", "use_bias=true", "--method-option", "lam_rate=1.5"]))
    assert (config.lr, config.optimizer, config.steps, config.epochs) == (0.02, "adam", 7, None)
    assert config.model_options == {"use_bias": True}
    assert config.method_options == {**GATES_OPTIONS, "lam_rate": 1.5}
    assert sources["lr"] == sources["model_options.use_bias"] == "user"
    assert sources["method_options.lam_rate"] == "user"
    assert sources["epochs"] == "user (--steps)"
    assert sources["optimizer"] == sources["method_options.gate"] == "recipe gates/mlp"


def test_recipe_none_is_the_library_defaults():
    config, sources = resolve_recipe(bare(["--method", "rigl", "--sparsity", "0.9",
                                           "--recipe", "none"]))
    assert {k: getattr(config, k) for k in LIBRARY} == LIBRARY
    assert config.distribution is None and config.model_options == {}
    assert set(sources.values()) == {"default"}


def test_a_resolved_config_resolves_to_itself():
    config, _ = resolve_recipe(TrainConfig(method="edge_popup", sparsity=0.5))
    again, sources = resolve_recipe(config)
    assert again == config
    # every value is now given, except the method's own default distribution
    assert {k for k, v in sources.items() if v != "user"} == {"distribution"}


def test_the_recipe_follows_the_model_family():
    conv, _ = resolve_recipe(TrainConfig(method="edge_popup", model="conv4", sparsity=0.5))
    assert (conv.batch_size, conv.weight_decay, conv.epochs) == (128, 5e-4, 1)
    assert conv.method_options == {"weight_init": "scaled_signed_constant"}
    resnet, _ = resolve_recipe(TrainConfig(method="edge_popup", model="resnet20",
                                           sparsity=0.5))
    assert resnet.model_options == {"use_bias": False, "norm_affine": False}
    vit, sources = resolve_recipe(TrainConfig(method="gates", model="vit_nnx", sparsity=0.9))
    assert (vit.optimizer, vit.lr, vit.epochs) == ("adam", 0.05, 2)
    assert sources["method_options.gate"] == "recipe gates/vit"
    # no recipe for dynamic sparse training on ResNets: library defaults
    rigl, sources = resolve_recipe(TrainConfig(method="rigl", model="resnet18", sparsity=0.9))
    assert (rigl.batch_size, rigl.optimizer, rigl.epochs) == (128, "sgd", 1)
    assert sources["batch_size"] == "default"


def test_gates_without_a_target_sparsity_keep_their_own_weight_init():
    config, _ = resolve_recipe(TrainConfig(method="gates"))
    assert "weight_init" not in config.method_options  # scaled weights need a sparsity
    assert config.method_options["gate"] == "gaussian"


def test_an_unknown_recipe_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match="unknown recipe 'paper'; known: auto, none"):
        resolve_recipe(TrainConfig(recipe="paper"))
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "paper"])
    assert "invalid choice: 'paper'" in capsys.readouterr().err


def test_result_json_records_the_effective_config_and_its_sources(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--method", "edge_popup", "--sparsity", "0.5", "--steps", "2",
                 "--lr", "0.05", "--out", str(out), "--no-progress", "--no-tensorboard"]) == 0
    assert "recipe edge_popup/mlp" in capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["batch_size"] == 64 and result["config"]["lr"] == 0.05
    assert result["config"]["model_options"] == {"use_bias": False}
    assert result["config_sources"]["batch_size"] == "recipe edge_popup/mlp"
    assert result["config_sources"]["lr"] == "user"
    saved = json.loads((out / "config.json").read_text())
    assert saved["config_sources"] == result["config_sources"]
    # the same command resumes; a run under other recipe values is refused
    assert main(["train", "--method", "edge_popup", "--sparsity", "0.5", "--steps", "3",
                 "--lr", "0.05", "--out", str(out), "--no-progress", "--no-tensorboard",
                 "--resume"]) == 0
    assert main(["train", "--method", "edge_popup", "--sparsity", "0.5", "--steps", "4",
                 "--lr", "0.05", "--out", str(out), "--no-progress", "--no-tensorboard",
                 "--resume", "--recipe", "none"]) == 2
    assert "--batch-size was 64, now 128" in capsys.readouterr().err


def test_docs_give_each_recipe_as_a_bare_command():
    """docs/results.md's recipe table: one row per recipe, whose bare command resolves to
    that recipe."""
    text = (ROOT / "docs" / "results.md").read_text()
    rows = re.findall(r"^\| `(\w+/\w+)` \| `sparsejax train ([^`]*)` \|", text, re.M)
    assert {name for name, _ in rows} == set(RECIPES)
    for name, command in rows:
        config, sources = resolve_recipe(bare(command.split()))
        assert f"recipe {name}" in sources.values(), (name, command)
        assert {k: getattr(config, k) for k in RECIPES[name].training} == dict(
            RECIPES[name].training)


def test_library_defaults_are_the_documented_ones():
    assert dict(LIBRARY_DEFAULTS) == {**LIBRARY, "distribution": None}
