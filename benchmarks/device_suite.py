"""The device suite: the step-time table and the top-k benchmark in one run, one JSON.

On a machine with an accelerator, run it as it is::

    python benchmarks/device_suite.py --json benchmarks/results/device_suite_gpu.json

It times every method of ``step_time.py`` against the dense step (and the user's plain
optax step) on LeNet-300-100, Conv-6, ResNet-18 and the GPT (4 x 128, 64 characters),
then the exact top-k candidates of ``topk.py`` up to 10^8 scores. The JSON names the
device (``device_kind``), the backend, the JAX version and the wall time. No row starts
after ``--budget-seconds`` (default 420: the last row started, at most one model's
compile and timing, has a minute of the 8 to finish); rows not started are listed under
``skipped``, never silently missing.

``--tiny`` runs the same code with tiny models and sizes (seconds, on a CPU); the test
suite runs it so the script cannot rot::

    python benchmarks/device_suite.py --tiny --json /tmp/device_suite_tiny.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

from step_time import METHOD_OPTIONS, MODELS, host, time_steps  # noqa: E402
from topk import CANDIDATES, time_topk  # noqa: E402

METHODS = [name for name in METHOD_OPTIONS if name != "dense"]
# On an accelerator: blocks of 50 steps (5 repeats) for the small models, 10 (3 repeats)
# for ResNet-18 and the GPT, whose compilation dominates the suite's time.
FULL = {"lenet300": {"block": 50, "repeats": 5}, "conv6": {"block": 50, "repeats": 5},
        "resnet18": {"block": 10, "repeats": 3}, "gpt": {"block": 10, "repeats": 3}}
TOPK_SIZES = [1e4, 1e5, 1e6, 1e7, 1e8]

# --tiny: a narrow LeNet (a dynamic method: two compiled phases) and a one-block GPT (a
# score method); the conv nets go through the same code, and their compilation alone
# would take the test's time
TINY_OPTIONS = {"lenet300": {"width": 0.05},
                "gpt": {"n_layer": 1, "n_embd": 16, "n_head": 2, "context": 8}}
TINY_METHODS = {"lenet300": ["rigl"], "gpt": ["edge_popup"]}
TINY_TOPK = ["sampled", "bitwise", "sort"]


def run_suite(*, tiny: bool = False, budget_seconds: float = 420.0) -> dict[str, Any]:
    """The suite's result: device, settings, step-time rows, top-k rows, skipped rows."""
    started = time.monotonic()
    deadline = started + budget_seconds
    step_rows: list[dict[str, Any]] = []
    plan = TINY_METHODS if tiny else {model: METHODS for model in MODELS}
    for model, methods in plan.items():
        if tiny:
            step_rows += time_steps([model], methods, block=2, repeats=1, batch_size=4,
                                    optax_baseline=True, model_options=TINY_OPTIONS,
                                    deadline=deadline)
        else:
            step_rows += time_steps([model], methods, optax_baseline=True,
                                    deadline=deadline, **FULL[model])
    sizes = [1e3] if tiny else TOPK_SIZES
    topk_rows = time_topk(sizes, TINY_TOPK if tiny else list(CANDIDATES),
                          max_slow_size=1e7, deadline=deadline)
    done = {(row["model"], row["method"]) for row in step_rows}
    skipped = [f"step_time {model} {name}" for model, methods in plan.items()
               for name in methods if (model, name) not in done]
    timed_sizes = {row["size"] for row in topk_rows}
    skipped += [f"topk n={int(size)}" for size in sizes if int(size) not in timed_sizes]
    return {"device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "jax_version": jax.__version__, **host(), "tiny": tiny,
            "budget_seconds": budget_seconds,
            "wall_seconds": round(time.monotonic() - started, 1),
            "step_time": step_rows, "topk": topk_rows, "skipped": skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny models and sizes: a smoke run of the same code on a CPU")
    parser.add_argument("--budget-seconds", type=float, default=420.0,
                        help="start no row after this many seconds (listed as skipped)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = run_suite(tiny=args.tiny, budget_seconds=args.budget_seconds)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['device_kind']}: {len(result['step_time'])} step-time rows, "
          f"{len(result['topk'])} top-k rows, skipped {result['skipped'] or 'none'}, "
          f"{result['wall_seconds']} s")


if __name__ == "__main__":
    main()
