"""Shared runner of the strong-ticket experiments on LeNet-300-100 / real MNIST.

Each configuration is one ``sparsejax.harness.training.loop.train`` run in ``runs/strong/<name>``
(ignored by git); its summary is appended to the experiment's JSON file in
``experiments/results/`` as soon as it finishes, and configurations already in that file
are skipped, so a script can be rerun (or resumed after a kill) at any time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax

from sparsejax.harness.provenance import provenance
from sparsejax.harness.training.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "strong"
# Real MNIST (IDX files): $SPARSEJAX_MNIST, else the checkout's sibling ../shared/data/mnist.
DEFAULT_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def mnist_dir(check: bool = True) -> str:
    """The MNIST folder of the experiments: ``$SPARSEJAX_MNIST`` if set, else
    ``<repository>/../shared/data/mnist``. With ``check`` (the default), a missing folder
    ends the script with one line naming the path looked at and how to give another one,
    not a traceback from deep inside the data loader."""
    override = os.environ.get("SPARSEJAX_MNIST")
    path = Path(override) if override else DEFAULT_MNIST
    if check and not path.is_dir():
        where = "SPARSEJAX_MNIST points at" if override else "expected the MNIST IDX files in"
        sys.exit(f"error: no MNIST folder: {where} {path}; set "
                 "SPARSEJAX_MNIST=/path/to/mnist (a folder holding the MNIST IDX files) to "
                 "use another one")
    return str(path)

# The paper's MNIST example: batch 64, SGD momentum 0.9, lr 0.1 cosine, wd 5e-4 (scores).
PAPER = {"batch_size": 64, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
         "weight_decay": 5e-4, "lr_schedule": "cosine"}


def train_once(config: TrainConfig) -> dict[str, Any]:
    """``train(config)``, then drop JAX's compiled programs. A driver that runs many
    configurations in one process otherwise keeps every run's executables: about 570
    memory mappings per tiny run, and on real MNIST a gates sweep hit the kernel's limit
    of 65,530 and died in LLVM ("Cannot allocate memory") in its sixth 40-epoch run."""
    try:
        return train(config)
    finally:
        jax.clear_caches()


def load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}}


def save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    payload = {**payload, "provenance": provenance()}
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def epoch_curve(run_dir: Path) -> list[float]:
    """Test accuracy at each evaluation of a run (from its metrics.jsonl)."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "test_accuracy" in record:
            curve.append(record["test_accuracy"])
    return curve


def run(name: str, method: str, density: float, epochs: int, *, seed: int = 0,
        method_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one configuration (LeNet-300-100 without biases, real MNIST)."""
    out = RUNS / name
    config = TrainConfig(
        method=method, model="lenet300", dataset="mnist", data_dir=mnist_dir(check=False),
        sparsity=round(1.0 - density, 6), epochs=epochs, seed=seed, out=str(out),
        progress=False, keep_checkpoints=1, log_every=200,
        model_options={"use_bias": False}, method_options=dict(method_options or {}),
        **PAPER)
    result_file = out / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        # a killed run continues (or, killed before its first checkpoint, starts again)
        config.resume = out.exists()
        mnist_dir()  # one line, not a traceback, when the data is missing
        started = time.time()
        result = train_once(config)
        print(f"{name}: {100 * result['test_accuracy']:.2f}% in {time.time() - started:.0f} s",
              flush=True)
    return {
        "method": method, "density": density, "epochs": epochs, "seed": seed,
        "method_options": dict(method_options or {}),
        "test_accuracy": result["test_accuracy"], "measured_sparsity": result["sparsity"],
        "wall_seconds": result["wall_seconds"], "steps": result["steps"],
        "test_accuracy_per_epoch": epoch_curve(out), "run_dir": str(out.relative_to(ROOT)),
    }
