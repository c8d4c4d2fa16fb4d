"""Per-method recipes: the defaults of ``sparsejax train`` for a method and a model family.

A user who gives only the method and the sparsity gets the recipe that produced the result
recorded for that method and model family in docs/results.md (or, where none was run here,
the published one in ``shared/REFERENCES.md``), the way open_lth keeps default
hyperparameters per model. Anything given on the command line or in Python wins, field
by field and option by option; ``recipe="none"`` turns the presets off (library defaults
only). :func:`resolve_recipe` returns the effective configuration and where each value
came from (``"user"``, ``"recipe <name>"`` or ``"default"``); ``result.json`` records both.

>>> from sparsejax.harness.training.loop import TrainConfig
>>> config, sources = resolve_recipe(TrainConfig(method="rigl", sparsity=0.9, lr=0.1))
>>> config.optimizer, config.lr, config.epochs, config.distribution
('nesterov', 0.1, 30, 'erk')
>>> sources["optimizer"], sources["lr"]
('recipe rigl/mlp', 'user')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsejax.harness.training.config import TrainConfig

__all__ = ["Recipe", "RECIPES", "RECIPE_CHOICES", "LIBRARY_DEFAULTS", "MODEL_FAMILIES",
           "TRAINING_FIELDS", "recipe_for", "resolve_recipe"]

RECIPE_CHOICES = ("auto", "none")

# The defaults of every field a recipe may set, where no recipe sets it. ``epochs`` is 1
# only when neither ``epochs`` nor ``steps`` is given; ``distribution`` None is the
# method's own default.
LIBRARY_DEFAULTS: Mapping[str, Any] = {
    "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
    "weight_decay": 0.0, "lr_schedule": "cosine", "epochs": 1, "distribution": None,
}
TRAINING_FIELDS = tuple(LIBRARY_DEFAULTS)

# Model name -> the family whose recipes it takes. Every recipe was measured on MNIST: the
# MLP ones on LeNet-300-100, the conv / resnet / vit ones (strong tickets only) on a
# Conv-4, a ResNet-20 and the NNX ViT at the widths and short budgets one CPU core allows
# (docs/results.md, "Strong tickets beyond MLPs").
MODEL_FAMILIES: Mapping[str, str] = {
    "lenet300": "mlp", "mlp": "mlp",
    "conv2": "conv", "conv4": "conv", "conv6": "conv", "conv8": "conv",
    "resnet18": "resnet", "resnet20": "resnet", "wrn22_2": "resnet",
    "vit_small": "vit", "vit_nnx": "vit",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The defaults of one method on one model family, and the result they produced."""

    name: str  # "<method>/<family>"
    source: str  # the recorded result (docs/results.md) or the paper it follows
    training: Mapping[str, Any]  # TrainConfig fields (TRAINING_FIELDS)
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # method options set only with a target sparsity (e.g. weights scaled by it)
    with_sparsity_only: tuple[str, ...] = ()


# RigL's MNIST defaults (REFERENCES.md), used for dense and every dynamic method.
_RIGL_MNIST = {"batch_size": 100, "optimizer": "nesterov", "lr": 0.2, "momentum": 0.9,
               "weight_decay": 1e-4, "lr_schedule": "cosine", "epochs": 30}
# Edge-Popup's MNIST example (its paper's code): batch 64, SGD, weight decay on the scores.
_EDGE_POPUP_MNIST = {"batch_size": 64, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
                     "weight_decay": 5e-4, "lr_schedule": "cosine", "epochs": 14}
# SNIP's reference training (SGD, L2 5e-4, batch 100) with cosine decay.
_SGD_WD = {"batch_size": 100, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
           "weight_decay": 5e-4, "lr_schedule": "cosine"}
_ADAM20 = {"batch_size": 100, "optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
           "weight_decay": 0.0, "lr_schedule": "cosine", "epochs": 20}
# The strong-ticket runs on Conv-4 / ResNet-20 / the ViT (MNIST, batch 128; issue #32):
# Edge-Popup's SGD setup (weight decay on the scores) and the gates' Adam recipe of
# gates/mlp, each for the budget measured, rounded up to whole epochs (300 / 300 / 800
# steps of 128 on 55,000 images: 0.70 / 0.70 / 1.86 epochs). Edge-Popup's CIFAR-10 setup (100
# epochs, weight decay 1e-4; REFERENCES.md), the recipe of these families before, was
# never run here: hours per run on this machine's CPU.
_SGD_SCORES = {"batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
               "weight_decay": 5e-4, "lr_schedule": "cosine"}
_ADAM_GATES = {"batch_size": 128, "optimizer": "adam", "lr": 0.05, "momentum": 0.9,
               "weight_decay": 0.0, "lr_schedule": "cosine"}
_GAUSSIAN_GATES = {"gate": "gaussian", "lam_rate": 2.0, "score_bounds": [-1.0, 1.5],
                   "weight_init": "scaled_signed_constant", "sigma_final": 0.05}
_FAMILY_EPOCHS = {"conv": 1, "resnet": 1, "vit": 2}
_NO_BIAS = {"use_bias": False}

_DST = "docs/results.md, Dynamic sparse training (30 epochs, 3 seeds)"
_STRONG = "docs/results.md, Strong lottery tickets"
_AT_INIT = "docs/results.md, Pruning at initialisation"
_FAMILIES = "docs/results.md, Strong tickets beyond MLPs (MNIST, 1 seed)"
# (method, family) -> the recorded result of its recipe (test accuracy % at target sparsity)
_FAMILY_RESULTS: Mapping[tuple[str, str], str] = {
    ("edge_popup", "conv"):
        "Conv-4 at width 0.25, 300 steps: 96.90 / 95.09 / 43.11 / 9.80 at 50 / 70 / 90 "
        "/ 95%",
    ("biprop", "conv"):
        "Conv-4 at width 0.25, 300 steps: 96.50 / 96.93 / 88.39 / 20.86 at 50 / 70 / 90 "
        "/ 95%",
    ("gates", "conv"):
        "Conv-4 at width 0.25, 300 steps: 39.75 / 15.06 / 9.06 / 9.80 at 50 / 70 / 90 / "
        "95%, Gaussian gate",
    ("edge_popup", "resnet"):
        "ResNet-20 at width 0.5, 300 steps: 96.05 / 97.39 / 95.71 / 81.02 at 50 / 70 / "
        "90 / 95%",
    ("biprop", "resnet"):
        "ResNet-20 at width 0.5, 300 steps: 96.29 / 97.33 / 76.15 / 78.66 at 50 / 70 / "
        "90 / 95%",
    ("gates", "resnet"):
        "ResNet-20 at width 0.5, 300 steps: 8.92 / 17.71 / 11.85 / 9.82 at 50 / 70 / 90 "
        "/ 95% (53.18 / 53.16 / 67.17 / 20.67 with batch norm statistics of the binary "
        "mask), Gaussian gate",
    ("edge_popup", "vit"):
        "the ViT (patch 7, width 64, depth 4), 800 steps: 88.47 / 88.89 / 83.84 / 69.58 "
        "at 50 / 70 / 90 / 95%",
    ("biprop", "vit"):
        "the ViT (patch 7, width 64, depth 4), 800 steps: 88.89 / 89.52 / 84.04 / 68.24 "
        "at 50 / 70 / 90 / 95%",
    ("gates", "vit"):
        "the ViT (patch 7, width 64, depth 4), 800 steps: 71.61 / 67.16 / 48.89 / 28.15 "
        "at 50 / 70 / 90 / 95%, Gaussian gate",
}
_STE = "docs/results.md, Straight-through sparsity (30 epochs, 3 seeds; the dense recipe)"

_ALL = (
    Recipe("dense/mlp", f"{_DST}: dense 98.51 +- 0.02 at lr 0.1 (lr 0.2 diverged)",
           {**_RIGL_MNIST, "lr": 0.1}),
    Recipe("static/mlp", f"{_DST}: 98.10 / 97.74 / 96.29 at 90 / 95 / 98%",
           {**_RIGL_MNIST, "distribution": "erk"}),
    Recipe("set/mlp", f"{_DST}: 98.31 at 90%", {**_RIGL_MNIST, "distribution": "erk"}),
    Recipe("rigl/mlp", f"{_DST}: 98.37 / 98.22 / 97.71 at 90 / 95 / 98%",
           {**_RIGL_MNIST, "distribution": "erk"}),
    Recipe("snfs/mlp", f"{_DST}: 98.41 at 90%", {**_RIGL_MNIST, "distribution": "erk"}),
    Recipe("ste_magnitude/mlp", f"{_STE}: 98.55 / 98.49 at 90 / 95% (ERK), 98.50 at 2:4",
           {**_RIGL_MNIST, "lr": 0.1, "distribution": "erk"}),
    Recipe("sr_ste/mlp", f"{_STE}: 98.39 at 2:4", {**_RIGL_MNIST, "lr": 0.1,
                                                 "distribution": "erk"}),
    Recipe("edge_popup/mlp",
           f"{_STRONG}: 98.08 at density 0.5, signed Kaiming constant, 14 epochs (1 seed)",
           _EDGE_POPUP_MNIST, _NO_BIAS, {"weight_init": "signed_constant"}),
    Recipe("biprop/mlp", f"{_STRONG}: 97.59 at density 0.5, 14 epochs (1 seed)",
           _EDGE_POPUP_MNIST, _NO_BIAS, {"weight_init": "kaiming_normal"}),
    Recipe("gates/mlp",
           "docs/results.md, Relaxed Bernoulli gates: scaled_anneal, 40 epochs, with the "
           "exact rule and the lift (97.64 +- 0.10 at 90.00%, 3 seeds)",
           {"batch_size": 128, "optimizer": "adam", "lr": 0.05, "momentum": 0.9,
            "weight_decay": 0.0, "lr_schedule": "cosine", "epochs": 40},
           _NO_BIAS,
           {"gate": "gaussian", "lam_rate": 2.0, "score_bounds": [-1.0, 1.5],
            "weight_init": "scaled_signed_constant", "sigma_final": 0.05},
           with_sparsity_only=("weight_init",)),
    Recipe("snip/mlp", f"{_AT_INIT}: sgd400wd, 98.03 / 97.08 at 95 / 98% (3 seeds)",
           {**_SGD_WD, "epochs": 400}),
    Recipe("grasp/mlp", f"{_AT_INIT}: sgd100wd, 97.80 / 96.80 at 95 / 98% (1 seed)",
           {**_SGD_WD, "epochs": 100}),
    Recipe("synflow/mlp", f"{_AT_INIT}: sgd100wd, 97.94 / 96.86 at 95 / 98% (1 seed)",
           {**_SGD_WD, "epochs": 100}),
    Recipe("random_prune/mlp", f"{_AT_INIT}: adam20, 95.41 / 60.67 at 95 / 98% (1 seed)",
           _ADAM20),
    Recipe("magnitude/mlp", f"{_AT_INIT}: adam20, 97.17 / 11.35 at 95 / 98% (1 seed)",
           _ADAM20),
    *(Recipe(f"{method}/{family}", f"{_FAMILIES}: {_FAMILY_RESULTS[method, family]}",
             {**training, "epochs": _FAMILY_EPOCHS[family]},
             {**_NO_BIAS, "norm_affine": False} if family == "resnet" else _NO_BIAS,
             options, with_sparsity_only=("weight_init",) if method == "gates" else ())
      for family in ("conv", "resnet", "vit")
      for method, training, options in (
          ("edge_popup", _SGD_SCORES, {"weight_init": "scaled_signed_constant"}),
          ("biprop", _SGD_SCORES, {"weight_init": "scaled_kaiming_normal"}),
          ("gates", _ADAM_GATES, _GAUSSIAN_GATES))),
)
RECIPES: Mapping[str, Recipe] = {recipe.name: recipe for recipe in _ALL}


def recipe_for(method: str, model: str) -> Recipe | None:
    """The recipe of ``method`` on ``model``'s family, or None where none is recorded.

    >>> recipe_for("edge_popup", "lenet300").training["batch_size"]
    64
    >>> recipe_for("gradual_magnitude", "lenet300") is None
    True
    """
    return RECIPES.get(f"{method}/{MODEL_FAMILIES.get(model, model)}")


def resolve_recipe(config: TrainConfig) -> tuple[TrainConfig, dict[str, str]]:
    """``config`` with every field a recipe may set made concrete (the user's value, else
    the recipe's, else the library default), and the source of each such value, keyed by
    field name and ``"model_options.<key>"`` / ``"method_options.<key>"``."""
    if config.recipe not in RECIPE_CHOICES:
        raise ValueError(f"unknown recipe {config.recipe!r}; known: "
                         f"{', '.join(RECIPE_CHOICES)} (auto: the method's recorded recipe "
                         "for the model's family; none: library defaults only)")
    recipe = recipe_for(config.method, config.model) if config.recipe == "auto" else None
    preset = dict(recipe.training) if recipe else {}
    label = f"recipe {recipe.name}" if recipe else "default"
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in TRAINING_FIELDS:
        given = getattr(config, name)
        if given is not None:
            values[name], sources[name] = given, "user"
        elif name == "epochs" and config.steps is not None:
            values[name], sources[name] = None, "user (--steps)"
        elif name in preset and not (name == "distribution" and config.sparsity is None):
            values[name], sources[name] = preset[name], label
        else:
            values[name], sources[name] = LIBRARY_DEFAULTS[name], "default"
    for field in ("model_options", "method_options"):
        given = dict(getattr(config, field))
        merged = dict(getattr(recipe, field)) if recipe else {}
        if recipe and config.sparsity is None:
            merged = {k: v for k, v in merged.items() if k not in recipe.with_sparsity_only}
        for key in merged:
            if key not in given:
                sources[f"{field}.{key}"] = label
        for key in given:
            sources[f"{field}.{key}"] = "user"
        values[field] = {**merged, **given}
    return dataclasses.replace(config, **values), sources
