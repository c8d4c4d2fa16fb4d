"""Compile time of a user's jitted train step, per method and model depth.

What a JAX user pays before the first step of every run: ``jax.jit(step).lower(...)``
(tracing) and ``.compile()`` (XLA), timed apart, each row in a fresh Python process so
that nothing compiled or traced by another row helps it (the persistent compilation
cache is off for the rows). The steps:

* ``plain``: the user's own dense optax step (``own_loop.user_step``: ``value_and_grad``,
  ``tx.update`` of ``optax.sgd(0.1, momentum=0.9)``, ``optax.apply_updates``, the carry
  donated): the baseline every ratio is against;
* ``static``, ``rigl``, ``set``, ``snfs``, ``gradual_magnitude``: the same step with
  ``tx = sparsejax.sparse_tx(method, optax.sgd(0.1, momentum=0.9), sparsity=0.9, ...)``
  (mask updates every 100 steps);
* ``edge_popup``, ``gates``: the native engine's step (``jax.grad`` of the loss at
  ``method.materialize(state, trainables)``, then ``method.update``), the step that
  ``sparsejax.linen`` and ``sparsejax.nnx`` run inside the user's ``apply_gradients``.

Models: ``mlpL``, an MLP of ``L`` Dense layers of 256x256 (tanh, batch 32; ``L`` = 2, 8,
32, 128); ``lenet300``, ``resnet18`` and ``gpt`` from ``sparsejax.harness.models`` at the batch
sizes of ``benchmarks/step_time.py``. ``--sparsegpt`` adds rows for the compile of
:func:`sparsejax.sparsegpt_prune`'s walk over one kernel of 256 outputs and ``n`` inputs;
``--cli`` rows time ``sparsejax train`` from its start to the end of its first step
(LeNet-300-100), without and with a warm persistent compilation cache.

Each JSON row: ``model``, ``method``, ``form``, ``kernels`` (the prunable leaves),
``init_s`` (the method's init, called eagerly as users call ``tx.init``, first call in
the process: its compiles included), ``lower_s``, ``compile_s``, ``total_s`` (of the
step), ``ratio_to_plain`` (of ``total_s``, against the plain row of the same model in
the same run), ``backend``, ``device``, ``host_cpus``,
``xla_flags`` and ``other_load``.

    python benchmarks/compile_time.py --json benchmarks/results/compile_time.json
    python benchmarks/compile_time.py --models mlp2 mlp32 --methods plain rigl
    python benchmarks/compile_time.py --models --sparsegpt 512 2048 4096 11008
    python benchmarks/compile_time.py --models --cli static rigl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MLP_DEPTHS = (2, 8, 32, 128)
MODELS = (*(f"mlp{depth}" for depth in MLP_DEPTHS), "lenet300", "resnet18", "gpt")
OPTAX_METHODS = ("plain", "static", "rigl", "set", "snfs", "gradual_magnitude")
NATIVE_METHODS = ("edge_popup", "gates")
METHODS = (*OPTAX_METHODS, *NATIVE_METHODS)
OPTIONS: dict[str, dict[str, Any]] = {
    "static": {"sparsity": 0.9},
    "rigl": {"sparsity": 0.9, "update_every": 100, "end_step": 10_000},
    "set": {"sparsity": 0.9, "update_every": 100},
    "snfs": {"sparsity": 0.9, "update_every": 100, "total_steps": 10_000},
    "gradual_magnitude": {"sparsity": 0.9, "total_steps": 10_000, "frequency": 100},
    "edge_popup": {"sparsity": 0.5},
    "gates": {"sparsity": 0.9},
}
RESULTS = Path(__file__).parent / "results" / "compile_time.json"


def _model(name: str) -> tuple[Any, Any, Any, Any]:
    """``(loss_fn, params, model_state, batch)`` with the library's loss signature."""
    import jax
    import jax.numpy as jnp

    if name.startswith("mlp"):
        depth = int(name[3:])
        key = jax.random.PRNGKey(0)
        params = {f"Dense_{i}": {
            "kernel": jax.random.normal(jax.random.fold_in(key, i), (256, 256)) * 0.06,
            "bias": jnp.zeros(256)} for i in range(depth)}

        def loss_fn(params: Any, model_state: Any, batch: Any) -> Any:
            x = batch
            for i in range(depth):
                layer = params[f"Dense_{i}"]
                x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
            return jnp.mean(x ** 2), (model_state, {})

        return loss_fn, params, {}, jnp.ones((32, 256))
    sys.path.insert(0, str(Path(__file__).parent))
    from step_time import setup

    return setup(name)


def _native_step(loss_fn: Any, method: Any) -> Any:
    import jax

    def step(state: Any, batch: Any) -> Any:
        def objective(trainables: Any) -> Any:
            loss, (model_state, _) = loss_fn(method.materialize(state, trainables),
                                             state.model_state, batch)
            return loss + method.penalty(state, trainables), model_state

        (loss, model_state), grads = jax.value_and_grad(objective, has_aux=True)(
            method.trainables(state))
        return method.update(state.replace(model_state=model_state), grads), loss

    return step


def one_row(model: str, method: str) -> dict[str, Any]:
    """Time tracing and compiling one step in this process (a fresh one)."""
    import jax
    import optax

    import sparsejax

    sys.path.insert(0, str(Path(__file__).parent))
    from own_loop import user_step  # the user's own step, the same as own_loop.py times

    loss_fn, params, model_state, batch = _model(model)
    jax.block_until_ready(params)
    sgd = optax.sgd(0.1, momentum=0.9)
    # The init as a user calls it, eagerly (optax's tx.init, Flax's TrainState.create),
    # first call in this process: its compiles included.
    start = time.perf_counter()
    if method in OPTAX_METHODS:
        tx = sgd if method == "plain" else sparsejax.sparse_tx(method, sgd, **OPTIONS[method])
        carry = jax.block_until_ready((params, model_state, tx.init(params)))
        init_s = time.perf_counter() - start
        step, args, form = user_step(loss_fn, tx), (carry, batch), "optax"
    else:
        built = sparsejax.get_method(method, sgd, **OPTIONS[method])
        state = jax.block_until_ready(built.init(params, jax.random.PRNGKey(1), model_state))
        init_s = time.perf_counter() - start
        step, args, form = jax.jit(_native_step(loss_fn, built)), (state, batch), "native"
    start = time.perf_counter()
    lowered = step.lower(*args)
    traced = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    kernels = sum(jax.tree_util.tree_leaves(sparsejax.prunable_leaves(params)))
    return {"model": model, "method": method, "form": form, "kernels": kernels,
            "init_s": round(init_s, 3), "lower_s": round(traced - start, 3),
            "compile_s": round(done - traced, 3), "total_s": round(done - start, 3)}


def sparsegpt_row(n_in: int, n_out: int = 256) -> list[dict[str, Any]]:
    """Compile :func:`sparsejax.sparsegpt_prune`'s walk over one ``(n_in, n_out)`` kernel."""
    import jax.numpy as jnp
    import numpy as np

    from sparsejax.core.patterns import as_pattern
    from sparsejax.posttrain.sparsegpt import sparsegpt_walk

    rows = []
    for pattern in ("unstructured", "2:4"):
        blocks = -(-n_in // 128)
        args = (jnp.ones((n_in, n_out)), jnp.eye(n_in), jnp.float32(0.01),
                np.full(blocks, n_out * 64, np.int32))
        start = time.perf_counter()
        lowered = sparsegpt_walk.lower(*args, pattern=as_pattern(pattern), blocksize=128)
        traced = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        rows.append({"model": f"kernel {n_in}x{n_out}", "method": f"sparsegpt {pattern}",
                     "form": "posttrain", "kernels": 1, "lower_s": round(traced - start, 3),
                     "compile_s": round(done - traced, 3), "total_s": round(done - start, 3)})
    return rows


_CLI_ARGS = ["--model", "lenet300", "--sparsity", "0.9", "--epochs", "1", "--no-progress",
             "--no-tensorboard"]


def cli_rows(methods: list[str]) -> list[dict[str, Any]]:
    """Seconds from the start of ``sparsejax train --method M`` (LeNet-300-100, MNIST-1D)
    to the end of its first step, in fresh processes: with no persistent compilation
    cache and MNIST-1D not kept yet (``cold``: a first run), then twice with fresh cache
    folders, the second run reading what the first wrote (``warm``). The probe is
    ``benchmarks/eager_calls.py``'s."""
    import tempfile

    from eager_calls import _CLI_PROBE

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for cache in ("cold", "fill", "warm"):
            for method in methods:
                env = {k: v for k, v in os.environ.items()
                       if not k.startswith("JAX_COMPILATION_CACHE")}
                if cache != "cold":  # as README.md says to turn the cache on
                    env["JAX_COMPILATION_CACHE_DIR"] = f"{folder}/cache"
                    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
                # generated datasets: kept from the fill run for the warm one
                env["SPARSEJAX_CACHE_DIR"] = f"{folder}/data-{cache}-{method}" if (
                    cache == "cold") else f"{folder}/data"
                start = time.time()
                done = subprocess.run(
                    [sys.executable, "-c", _CLI_PROBE, repr(start), "train", "--method",
                     method, *_CLI_ARGS, "--out", f"{folder}/{cache}-{method}"],
                    env=env, capture_output=True, text=True, check=True)
                if cache != "fill":
                    rows.append({"model": "lenet300", "method": method, "form": "cli",
                                 "cache": cache, "first_step_s":
                                 round(float(done.stdout.split()[-1]), 3),
                                 "command": f"sparsejax train --method {method} "
                                            + " ".join(_CLI_ARGS)})
    return rows


def _in_fresh_process(args: list[str]) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sparsegpt", nargs="*", type=int, default=[],
                        help="input widths of SparseGPT kernels to compile")
    parser.add_argument("--cli", nargs="*", default=[], choices=["static", "rigl"],
                        help="time sparsejax train to its first step, cold and warm cache")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--other-load", default="none of ours",
                        help="what else was running, recorded in every row")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--sparsegpt-row", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps([one_row(*args.row)]))
        return
    if args.sparsegpt_row:
        print(json.dumps(sparsegpt_row(args.sparsegpt_row)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    import jax  # noqa: F401  (host() reads the backend)
    from step_time import host

    methods = ["plain", *[m for m in args.methods if m != "plain"]]
    rows = []
    for model in args.models:
        plain = None
        for method in methods:
            row = _in_fresh_process(["--row", model, method])[0]
            plain = row["total_s"] if method == "plain" else plain
            row["ratio_to_plain"] = round(row["total_s"] / plain, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for n_in in args.sparsegpt:
        for row in _in_fresh_process(["--sparsegpt-row", str(n_in)]):
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in cli_rows(args.cli) if args.cli else []:
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        row.update(host(), other_load=args.other_load)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
