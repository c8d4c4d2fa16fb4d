"""Accuracy-versus-sparsity figures from ``result.json`` files.

Two kinds of result are read: a ``sparsejax train`` run's ``result.json`` (one point,
labelled by its ``method``) and the branches of a ``sparsejax lottery`` run,
``<run>/round_NN/<branch>/result.json`` (one point per round: the IMP ``ticket`` and each
control, ``reinit`` / ``random_mask``, as its own line). A lottery run's ``instability/``
copies are not accuracy-versus-sparsity points and are skipped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparsejax.harness._extras import require
from sparsejax.io.files import read_json

__all__ = ["find_results", "load_results", "plot_accuracy_vs_sparsity"]

EXPECTED = ("result.json files of 'sparsejax train' runs, or a 'sparsejax lottery' run "
            "folder (round_NN/<branch>/result.json)")
_LOTTERY_LABELS = {"ticket": "IMP ticket", "reinit": "control: reinit",
                   "random_mask": "control: random mask"}


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """``result.json`` files named directly or found anywhere under the given folders."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(path.rglob("result.json")))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no result file or folder at {path}")
    return found


def _lottery_branch(path: Path) -> tuple[Path, str] | None:
    """``(run folder, branch)`` of a lottery branch's ``round_NN/<branch>/result.json``."""
    if len(path.parts) >= 3 and re.fullmatch(r"round_\d+", path.parent.parent.name):
        return path.parent.parent.parent, path.parent.name
    return None


def _is_instability_copy(path: Path) -> bool:
    return "instability" in path.parts[:-1]


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The parsed results, each with ``method``, ``sparsity`` and ``test_accuracy``
    (``[]`` when the paths hold none).

    A ``sparsejax train`` result has them itself; a lottery branch's result gets
    ``method`` from its branch (``'IMP ticket'``, ``'control: reinit'``, ...; with the run
    folder's name added when several lottery runs are plotted together), plus ``round``.
    """
    results = []
    lottery: list[tuple[dict[str, Any], Path, str]] = []
    for path in find_results(paths):
        branch = _lottery_branch(path)
        result = read_json(path, "a sparsejax result")
        if "method" not in result and branch is None and _is_instability_copy(path):
            continue
        if "method" not in result and branch is not None:
            missing = {"sparsity", "test_accuracy"} - set(result)
            if missing:
                raise ValueError(f"{path} is not a lottery round's result: missing "
                                 f"{sorted(missing)}")
            lottery.append((result, *branch))
            continue
        missing = {"method", "sparsity", "test_accuracy"} - set(result)
        if missing:
            raise ValueError(f"{path} is not a sparsejax result: missing {sorted(missing)}; "
                             f"expected {EXPECTED}")
        results.append(result)
    runs = {run for _, run, _ in lottery}
    for result, run, branch in lottery:
        label = _LOTTERY_LABELS.get(branch, f"control: {branch}")
        if len(runs) > 1:
            label = f"{label} ({run.name})"
        results.append({**result, "method": label})
    return results


def plot_accuracy_vs_sparsity(results: list[dict[str, Any]], output: str | Path,
                              title: str | None = None) -> Path:
    """Test accuracy against sparsity, one line per method (mean and min-max over seeds at
    the same sparsity), saved as a PNG at ``output``."""
    plt = pyplot()
    if not results:
        raise ValueError(f"no results to plot: expected {EXPECTED}")
    by_method: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        by_method[r["method"]][round(float(r["sparsity"]), 3)].append(100 * r["test_accuracy"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, points in sorted(by_method.items()):
        xs = sorted(points)
        means = [sum(points[x]) / len(points[x]) for x in xs]
        lows = [min(points[x]) for x in xs]
        highs = [max(points[x]) for x in xs]
        ax.plot([100 * x for x in xs], means, marker="o", label=method)
        ax.fill_between([100 * x for x in xs], lows, highs, alpha=0.2)
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return save_figure(fig, output)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (the ``plots`` extra)."""
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")


def save_figure(fig: Any, output: str | Path) -> Path:
    """Lay out ``fig``, write it to ``output`` (parent folders made) and close it; returns
    the path written: ``output``, with ``.png`` added when it has no suffix (matplotlib
    adds it; ``plot -o runs/p`` used to print ``wrote runs/p`` for ``runs/p.png``)."""
    plt = pyplot()
    output = Path(output)
    if not output.suffix:
        output = output.with_name(output.name + ".png")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output
