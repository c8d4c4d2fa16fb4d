"""``sparsejax demo``: what sparsejax is for, in well under two minutes on two CPU cores.

Trains, in one process and on MNIST-1D (generated locally, no data folder), the same MLP
four ways at one sparsity: dense, a static ERK mask, RigL (prune and regrow) and a strong
ticket (relaxed Bernoulli gates over frozen random weights). Each is an ordinary
``train(TrainConfig(...))`` run in ``OUT/<method>/``; the demo then prints a table (method,
measured sparsity, test accuracy, seconds) and writes ``OUT/demo.json`` (the rows) and
``OUT/demo.png`` (accuracy bars).

The settings below were tuned briefly on 2 CPU cores (seeds 0 and 1, 3000 steps each;
the whole demo takes 28 s on idle cores, 36-41 s beside another job):
dense about 71-74%, static ERK 65-66%, RigL 67-70%, gates 52-54% test accuracy at 90%
sparsity (the MNIST-1D paper reports about 68% for its dense MLP).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparsejax.harness._extras import require
from sparsejax.harness.provenance import provenance
from sparsejax.io.files import write_json

__all__ = ["DEMO_MODEL", "DEMO_COMMON", "DEMO_METHODS", "run_demo", "format_table",
           "plot_demo", "add_commands"]

# --------------------------------------------------------------------------------------
# The settings of the demo: one model and data set for all, then per-method settings.
# --------------------------------------------------------------------------------------

# LeNet-300-100 at twice the width (600-200-10, about 150k weights): strong tickets need
# the width (at width 1 the gates reach about 32% at 90% sparsity, at width 2 about 53%),
# and it costs the other methods nothing.
DEMO_MODEL: dict[str, Any] = {"model": "lenet300", "model_options": {"width": 2}}

# Shared by every method: MNIST-1D (4000 train / 1000 test signals of length 40),
# batches of 128, 3000 steps (about 96 epochs), cosine learning-rate decay; SGD takes
# the library's momentum, 0.9. The methods' recipes (tuned for MNIST and longer runs) are
# off: these settings were tuned for this demo.
DEMO_COMMON: dict[str, Any] = {"dataset": "mnist1d", "batch_size": 128, "steps": 3000,
                               "lr_schedule": "cosine", "recipe": "none"}

# method key -> (label in the table, TrainConfig fields). ``sparsity`` is the demo's
# --sparsity for every method but dense.
DEMO_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense", {"method": "dense", "optimizer": "sgd", "lr": 0.1}),
    "static": ("static ERK mask", {"method": "static", "optimizer": "sgd", "lr": 0.1,
                                   "distribution": "erk"}),
    "rigl": ("RigL (ERK)", {"method": "rigl", "optimizer": "sgd", "lr": 0.1,
                            "distribution": "erk"}),
    # A strong ticket: only the gates over frozen signed-constant weights train. Adam at
    # 1e-2 reaches about 53% here (SGD at 0.1 reached about 20% at width 1; edge_popup
    # with Adam at 1e-2 about 34% at width 2; 6000 steps of gates collapsed to about 26%).
    "gates": ("gates (strong ticket)", {"method": "gates", "optimizer": "adam", "lr": 1e-2}),
}

DEFAULT_SPARSITY = 0.9
DEFAULT_OUT = "runs/demo"
RESULT_FILE = "demo.json"
PLOT_FILE = "demo.png"


def _check_demo_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
            math.isfinite(sparsity) and 0 < sparsity < 1):
        raise ValueError(f"--sparsity must lie in (0, 1) for the demo, got {sparsity!r}")
    return float(sparsity)


def _configs(out: Path, sparsity: float, seed: int, overwrite: bool, steps: int | None,
             progress: bool) -> dict[str, Any]:
    from sparsejax.harness.training.loop import TrainConfig

    configs = {}
    for key, (_, fields) in DEMO_METHODS.items():
        values = {**DEMO_COMMON, **DEMO_MODEL, **fields}
        values["model_options"] = dict(values["model_options"])
        if steps is not None:
            values["steps"] = steps
        if fields["method"] != "dense":
            values["sparsity"] = sparsity
        total = values["steps"]
        configs[key] = TrainConfig(
            **values, seed=seed, out=str(out / key), overwrite=overwrite, progress=progress,
            tensorboard=False, eval_every=max(total // 10, 1), log_every=max(total // 30, 1),
            checkpoint_every=total, keep_checkpoints=1)
    return configs


def _refuse_existing(out: Path) -> None:
    from sparsejax.harness.training.run_folder import holds_run

    held = [f"{key}/" for key in DEMO_METHODS if holds_run(out / key)]
    held += [name for name in (RESULT_FILE, PLOT_FILE) if (out / name).exists()]
    if held:
        raise FileExistsError(
            f"{out} already holds a demo run ({', '.join(held)}); pass --overwrite to "
            "replace it, or choose another --out")


def run_demo(out: str | Path = DEFAULT_OUT, *, sparsity: float = DEFAULT_SPARSITY,
             seed: int = 0, overwrite: bool = False, progress: bool = True,
             steps: int | None = None, echo: Callable[[str], Any] | None = print
             ) -> list[dict[str, Any]]:
    """Train every method of :data:`DEMO_METHODS` into ``out/<method>/``, print the table,
    write ``out/demo.json`` and ``out/demo.png``, and return the rows.

    ``steps`` replaces the demo's training length (3000 steps) for every method: tests use
    a few steps. A folder that already holds a demo is refused unless ``overwrite``.
    Each row: ``method``, ``label``, ``sparsity`` (measured: the fraction of prunable
    weights that are zero in the effective model), ``test_accuracy`` (0 to 1),
    ``seconds`` (the run's wall time, data and compilation included) and ``steps``.
    """
    from sparsejax.core.validation import check_writable_folder
    from sparsejax.harness.training.config import check_config
    from sparsejax.harness.training.loop import train
    from sparsejax.harness.training.recipes import resolve_recipe

    started = time.time()
    sparsity = _check_demo_sparsity(sparsity)
    out = Path(out)
    configs = _configs(out, sparsity, seed, overwrite, steps, progress)
    for config in configs.values():  # every bad value fails before anything trains
        check_config(resolve_recipe(config)[0])
    check_writable_folder(out, "--out")
    if not overwrite:
        _refuse_existing(out)
    require("matplotlib")  # the plot at the end needs the ``plots`` extra: fail first
    rows = []
    for index, (key, config) in enumerate(configs.items(), start=1):
        label = DEMO_METHODS[key][0]
        print(f"[{index}/{len(configs)}] {label}: {config.method} {config.optimizer} "
              f"lr {config.lr:g}, {config.steps} steps -> {config.out}", file=sys.stderr)
        result = train(config)
        rows.append({"method": key, "label": label, "sparsity": result["sparsity"],
                     "test_accuracy": result["test_accuracy"],
                     "seconds": result["wall_seconds"], "steps": result["steps"]})
    total_seconds = time.time() - started
    summary = {"dataset": DEMO_COMMON["dataset"], **DEMO_MODEL, "sparsity": sparsity,
               "seed": seed, "rows": rows, "total_seconds": total_seconds,
               "provenance": provenance()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULT_FILE, summary)
    plot_demo(rows, out / PLOT_FILE, sparsity)
    if echo is not None:
        echo(format_table(rows))
        echo(f"total {total_seconds:.0f} s; rows in {out / RESULT_FILE}, "
             f"plot in {out / PLOT_FILE}")
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    width = max(len("method"), *(len(r["label"]) for r in rows))
    lines = [f"{'method':<{width}}  sparsity  test accuracy  seconds",
             f"{'-' * width}  --------  -------------  -------"]
    for r in rows:
        lines.append(f"{r['label']:<{width}}  {100 * r['sparsity']:7.1f}%  "
                     f"{100 * r['test_accuracy']:12.1f}%  {r['seconds']:7.1f}")
    return "\n".join(lines)


def plot_demo(rows: Sequence[dict[str, Any]], output: str | Path, sparsity: float) -> Path:
    """Test accuracy of each row as a bar (labelled with its measured sparsity), as PNG."""
    from sparsejax.harness.plotting import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    labels = [f"{r['label']}\n{100 * r['sparsity']:.0f}% sparse" for r in rows]
    accuracies = [100 * r["test_accuracy"] for r in rows]
    bars = ax.bar(range(len(rows)), accuracies, color=[f"C{i}" for i in range(len(rows))])
    for bar, accuracy in zip(bars, accuracies, strict=True):
        ax.annotate(f"{accuracy:.1f}%", (bar.get_x() + bar.get_width() / 2, accuracy),
                    ha="center", va="bottom", xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    width = DEMO_MODEL["model_options"].get("width", 1)
    ax.set_title(f"MNIST-1D, LeNet-300-100 (width x{width:g}), target sparsity "
                 f"{100 * sparsity:g}%", fontsize=10)
    return save_figure(fig, output)


def _demo_command(args: argparse.Namespace) -> int:
    run_demo(args.out, sparsity=args.sparsity, seed=args.seed, overwrite=args.overwrite,
             progress=args.progress)
    return 0


def add_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``demo`` to the ``sparsejax`` parser; returns its handler."""
    demo = commands.add_parser(
        "demo", help="dense, static ERK, RigL and a strong ticket at one sparsity on "
                     "MNIST-1D: a table and a plot in under a minute on 2 CPU cores")
    demo.add_argument("--out", default=DEFAULT_OUT,
                      help="output folder: one run folder per method, demo.json, demo.png "
                           f"(default: {DEFAULT_OUT})")
    demo.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY,
                      help="fraction of prunable weights removed by every method but dense, "
                           f"in (0, 1) (default: {DEFAULT_SPARSITY})")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the data, weights, data order and methods, in "
                           "[0, 2**32 - 1] (default: 0)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace a demo already in --out instead of refusing to start")
    demo.add_argument("--no-progress", dest="progress", action="store_false",
                      help="do not show the progress bars")
    return {"demo": _demo_command}
