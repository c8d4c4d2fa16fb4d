"""Accuracy-versus-sparsity figures from ``result.json`` files."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["find_results", "load_results", "plot_accuracy_vs_sparsity"]


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


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The parsed result files; each must have ``method``, ``sparsity``, ``test_accuracy``."""
    results = []
    for path in find_results(paths):
        try:
            result = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from error
        if not isinstance(result, dict):
            raise ValueError(f"{path} is not a sparsejax result: not a JSON object")
        missing = {"method", "sparsity", "test_accuracy"} - set(result)
        if missing:
            raise ValueError(f"{path} is not a sparsejax result: missing {sorted(missing)}")
        results.append(result)
    return results


def plot_accuracy_vs_sparsity(results: list[dict[str, Any]], output: str | Path,
                              title: str | None = None) -> Path:
    """Test accuracy against sparsity, one line per method (mean and min-max over seeds at
    the same sparsity), saved as a PNG at ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot")
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
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output
