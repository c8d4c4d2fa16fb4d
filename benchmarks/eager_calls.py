"""Eager (un-jitted) calls: the first and the second call of the same thing.

A research call (``sparsejax.topk_mask`` on a leaf, ``method.init`` on a model) compiles
on its first call; a second call with the same shapes and options must reuse that
program. Each case runs in a fresh Python process, so its first call pays the whole
compilation and nothing compiled by another case helps it:

* ``topk_mask``: ``topk_mask(scores, 0.1)`` on 235,200 float32 scores (784x300, the size
  of LeNet-300-100's first kernel), then again on other scores of that shape;
* ``init/<method>``: ``method.init(params, key)`` on LeNet-300-100's params, first with a
  fresh method, then with a second method built from the same options (``second``), then
  once more with that method (``third``);
* ``update/<method>``: ``tx.update(grads, opt_state, params)`` of
  ``sparse_tx(method, ...)`` with a mask decision at every call (``update_every=1``), or
  ``method.update(state, grads)`` for Edge-Popup and the gates, three calls in a row on
  LeNet-300-100, each on the state the previous one returned;
* ``cli``: ``sparsejax train --method static --sparsity 0.9 --distribution erk --epochs 1``
  from the start of the process to the end of its first training step (compiled, run,
  and its result ready), imports included.

Each row: ``case``, ``first_s``, ``second_s`` (and ``third_s``), the compilations of
each call (``first_compiles``, ...; XLA backend compilations), ``backend``,
``host_cpus``, ``xla_flags`` and ``other_load``.

    python benchmarks/eager_calls.py            # writes benchmarks/results/eager_calls.json
    python benchmarks/eager_calls.py --cases topk_mask init/static --json /tmp/e.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

UPDATE_OPTIONS: dict[str, dict[str, Any]] = {
    "static": {}, "rigl": {"update_every": 1, "end_step": 1000},
    "set": {"update_every": 1}, "snfs": {"update_every": 1, "total_steps": 1000},
    "gradual_magnitude": {"total_steps": 1000, "frequency": 1}}
CASES = ("topk_mask", "init/static", "init/rigl", "init/edge_popup",
         *(f"update/{name}" for name in (*UPDATE_OPTIONS, "edge_popup", "gates")), "cli")
RESULTS = Path(__file__).parent / "results" / "eager_calls.json"
_CLI_ARGS = ["train", "--method", "static", "--sparsity", "0.9", "--distribution", "erk",
             "--epochs", "1", "--no-progress", "--no-tensorboard"]


def _compile_counter() -> list[int]:
    import jax
    from jax._src import dispatch

    count = [0]

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    return count


def _timed(call: Any, count: list[int]) -> tuple[float, int]:
    import jax

    count[0] = 0
    start = time.perf_counter()
    jax.block_until_ready(call())
    return round(time.perf_counter() - start, 4), count[0]


def run_case(case: str) -> dict[str, Any]:
    """One case in this process (called in a fresh subprocess by :func:`main`)."""
    import jax
    import optax

    import sparsejax
    from sparsejax.harness.models import get_model, init_model

    count = _compile_counter()
    row: dict[str, Any] = {"case": case}
    if case == "topk_mask":
        first, second = (jax.random.normal(jax.random.PRNGKey(i), (784, 300)) for i in (0, 1))
        calls = [lambda: sparsejax.topk_mask(first, 0.1),
                 lambda: sparsejax.topk_mask(second, 0.1)]
        row["scores"] = 784 * 300
    elif case.startswith("update/"):
        # tx.update of sparse_tx, or method.update for the score methods, called eagerly
        # three times in a row, each on the state the previous call returned (a mask
        # decision on every call: update_every=1)
        name = case.split("/", 1)[1]
        params, _ = init_model(get_model("lenet300", 10), jax.random.PRNGKey(0), (1, 784))
        grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
        sgd = optax.sgd(0.1, momentum=0.9)
        holder: dict[str, Any] = {}
        if name in UPDATE_OPTIONS:
            tx = sparsejax.sparse_tx(name, sgd, sparsity=0.9, **UPDATE_OPTIONS[name])
            holder["state"] = tx.init(params)

            def call() -> Any:
                updates, holder["state"] = tx.update(grads, holder["state"], params)
                return updates
        else:
            method = sparsejax.get_method(name, sgd, sparsity=0.5)
            holder["state"] = method.init(params, jax.random.PRNGKey(1))
            trainable_grads = jax.tree_util.tree_map(jax.numpy.ones_like,
                                                     method.trainables(holder["state"]))

            def call() -> Any:
                holder["state"] = method.update(holder["state"], trainable_grads)
                return holder["state"]
        calls = [call, call, call]
        row["model"] = "lenet300"
    else:
        name = case.split("/", 1)[1]
        options = {"static": {}, "rigl": {"end_step": 1000}, "edge_popup": {}}[name]
        params, _ = init_model(get_model("lenet300", 10), jax.random.PRNGKey(0), (1, 784))
        jax.block_until_ready(params)

        def build() -> sparsejax.Method:
            return sparsejax.get_method(name, optax.sgd(0.1, momentum=0.9), sparsity=0.9,
                                        **options)

        key = jax.random.PRNGKey(1)
        second_method = build()
        calls = [lambda: build().init(params, key), lambda: second_method.init(params, key),
                 lambda: second_method.init(params, key)]
        row["model"] = "lenet300"
    for label, call in zip(("first", "second", "third"), calls, strict=False):
        row[f"{label}_s"], row[f"{label}_compiles"] = _timed(call, count)
    return row


_CLI_PROBE = """
import os, sys, time
start = float(sys.argv[1])
import jax
import sparsejax.harness.training.loop as loop
make_trainer = loop.make_trainer

def first_step_stops(*args, **kwargs):
    trainer = make_trainer(*args, **kwargs)
    step = trainer.step

    def timed_step(state, batch):
        jax.block_until_ready(step(state, batch))
        print(time.time() - start, flush=True)
        os._exit(0)

    trainer.step = timed_step
    return trainer

loop.make_trainer = first_step_stops
from sparsejax.harness.cli import main
main(sys.argv[2:])
"""


def cli_case() -> dict[str, Any]:
    """Seconds from the start of ``sparsejax train`` to the end of its first step."""
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        done = subprocess.run([sys.executable, "-c", _CLI_PROBE, repr(start), *_CLI_ARGS,
                               "--out", f"{out}/run"], capture_output=True, text=True,
                              check=True)
    return {"case": "cli", "first_step_s": round(float(done.stdout.split()[-1]), 3),
            "command": "sparsejax " + " ".join(_CLI_ARGS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a subprocess
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return

    from step_time import host, write_json  # same folder

    rows = []
    for case in args.cases:
        if case == "cli":
            row = cli_case()
        else:
            done = subprocess.run([sys.executable, __file__, "--case", case],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.splitlines()[-1])
        row.update(host())
        row["other_load"] = "other engineers' jobs may have been running"
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
