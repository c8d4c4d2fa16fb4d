"""Compiled train-step time of every method against the dense step of the same model.

For each (method, model) the dense step and the method's step, each as the training loop
runs it (``SingleDeviceTrainer``: the state donated, and for methods whose masks move on a
schedule a separately compiled step for the steps that move them), are compiled, warmed up,
and then timed in alternation in this one process (blocks of ``--block`` steps, the
median over ``--repeats`` blocks), so machine noise hits both alike. Methods that
change masks every N steps are timed over blocks that are a multiple of N steps, so the
update's cost is amortised exactly as in training.

With ``--amortize separate`` (for models whose step takes a second on CPU, where blocks
of 100 steps per method would take hours) the blocks hold no mask update, one update step
is timed on its own (the state moved to the step before an update), and the amortized
time is ``((N - 1) * step + update) / N`` for an update every N steps.

    python benchmarks/step_time.py --json benchmarks/results/step_time_cpu.json
    python benchmarks/step_time.py --models lenet300 --methods dense static rigl
    python benchmarks/step_time.py --models resnet18 --block 3 --repeats 3 \
        --amortize separate

With ``--optax-baseline`` a third step joins the alternation: the user's own plain optax
dense step of the same model (``own_loop.user_step``: ``value_and_grad``, ``tx.update``
of ``optax.sgd(0.1, momentum=0.9)``, ``optax.apply_updates``), and each row also gets
``optax_dense_ms`` and ``ratio_to_optax`` (what the method costs against the loop a
user had before sparsejax).

Each JSON row: ``method``, ``model``, ``batch_size``, ``dense_ms``, ``method_ms``,
``ratio``, ``backend``, ``update_interval`` (steps between mask updates, if any),
``amortize`` and, with ``separate``, ``step_ms`` and ``update_ms``; ``host_cpus`` (the
cores the process may run on) and ``xla_flags``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax
from sparsejax.engine.parallel import SingleDeviceTrainer
from sparsejax.harness.models import get_model, init_model
from sparsejax.harness.training.loop import classification_loss
from sparsejax.methods import InitContext

# model -> (input shape, batch size); CIFAR-sized inputs for the conv nets; the GPT reads
# 64 character ids (tinyshakespeare's 65-character vocabulary) and predicts the next ones
MODELS = {"lenet300": ((28, 28, 1), 128), "conv6": ((32, 32, 3), 64),
          "resnet18": ((32, 32, 3), 32), "gpt": ((64,), 32)}
VOCAB = {"gpt": 65}

# method -> options; update intervals are the papers' (RigL: 100 steps)
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "dense": {},
    "static": {"sparsity": 0.9},
    "magnitude": {"sparsity": 0.9},
    "snip": {"sparsity": 0.9},
    "set": {"sparsity": 0.9, "update_every": 100},
    "rigl": {"sparsity": 0.9, "update_every": 100},
    "snfs": {"sparsity": 0.9, "update_every": 100},
    "edge_popup": {"sparsity": 0.5},
    "gates": {"sparsity": 0.9},  # with a target (a controller step), as in the reproductions
    # the gates with their noise read from a pool drawn at init (issue #22)
    "gates_pool": {"sparsity": 0.9, "noise": "pool"},
    "biprop": {"sparsity": 0.5},
    # straight-through: a top-k of the current weights every step (issue #31)
    "ste_magnitude": {"sparsity": 0.9},
    "ste_random": {"sparsity": 0.9},  # its random scores drawn every step (draws_per_leaf)
    "ste_magnitude_24": {"sparsity": 0.5, "pattern": "2:4"},
    "sr_ste_24": {"sparsity": 0.5, "pattern": "2:4"},
    # ResNet-18's stem conv has 3 input channels, which 2:4 cannot split: kept dense
    "sr_ste_24_dense_stem": {"sparsity": 0.5, "pattern": "2:4",
                             "overrides": {"stem_conv/kernel": 1.0}},
}
# rows that time a registered method under another name, with other options
VARIANTS = {"gates_pool": "gates", "ste_magnitude_24": "ste_magnitude", "sr_ste_24": "sr_ste",
            "sr_ste_24_dense_stem": "sr_ste"}


def setup(model_name: str, batch_size: int | None = None, **model_options: Any
          ) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
    """``(loss_fn, params, model_state, batch)`` for ``model_name``: the model (with
    ``model_options``) initialised from key 0 and one fixed batch of random inputs and
    labels of the benchmark's size (or ``batch_size``)."""
    shape, default_batch = MODELS[model_name]
    batch_size = batch_size or default_batch
    classes = VOCAB.get(model_name, 10)
    model = get_model(model_name, classes, **model_options)
    if model_name == "gpt":
        shape = (min(shape[0], model.context),)
    params, model_state = init_model(model, jax.random.PRNGKey(0), (1, *shape))
    rng = np.random.default_rng(0)
    if model_name in VOCAB:  # token ids in, the next token of each position out
        tokens = rng.integers(0, classes, (batch_size, shape[0] + 1))
        batch = {"image": jnp.asarray(tokens[:, :-1], jnp.int32),
                 "label": jnp.asarray(tokens[:, 1:], jnp.int32)}
    else:
        batch = {"image": jnp.asarray(rng.normal(size=(batch_size, *shape)), jnp.float32),
                 "label": jnp.asarray(rng.integers(0, classes, batch_size), jnp.int32)}
    return classification_loss(model), params, model_state, batch


def device_name() -> str:
    """The device the rows ran on: the accelerator's kind, or the CPU's model name."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.platform}: {device.device_kind}"
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if
                     line.startswith("model name")]
    except OSError:
        names = []
    return f"cpu: {names[0] if names else 'unknown model'}"


def host() -> dict[str, Any]:
    """Where a row ran: the backend, the device (:func:`device_name`: an accelerator's kind,
    or the CPU's model), the cores the process may use, the XLA flags."""
    return {"backend": jax.default_backend(), "device": device_name(),
            "host_cpus": len(os.sched_getaffinity(0)),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def write_json(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """Write the rows to ``path`` (``--json``), if one was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")


def build(name: str, total_steps: int) -> sparsejax.Method:
    options = dict(METHOD_OPTIONS[name])
    name = VARIANTS.get(name, name)
    accepted = inspect.signature(sparsejax.METHODS[name]).parameters
    if "total_steps" in accepted:
        options["total_steps"] = total_steps
    if "batches_per_epoch" in accepted:
        options["batches_per_epoch"] = 100
    options = {k: v for k, v in options.items() if k in accepted}
    return sparsejax.get_method(name, optax.sgd(0.1, momentum=0.9), **options)


def init_state(method: sparsejax.Method, loss_fn: Any, params: Any, model_state: Any,
               batch: Any) -> sparsejax.SparseState:
    """The method's initial state, scored on ``batch`` where the method needs data."""

    @jax.jit
    def init(params: Any, model_state: Any, batch: Any) -> sparsejax.SparseState:
        return method.init(params, jax.random.PRNGKey(1), model_state,
                           InitContext(loss_fn, (batch,)))

    return init(params, model_state, batch)


def block_time(step, state, batch, steps: int):
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps * 1e3, state


def interleaved_medians(steps: dict[str, Any], states: dict[str, Any], batch: Any,
                        block: int, repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Time ``repeats`` rounds of one ``block``-step block per entry of ``steps``, in
    turn, so that machine noise hits all alike: the median ms per step of each, and the
    states after the last block."""
    states = dict(states)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t, states[name] = block_time(step, states[name], batch, block)
            times[name].append(t)
    return {name: statistics.median(t) for name, t in times.items()}, states


def warm_up(step, method: sparsejax.Method, state, batch):
    """Compile and run a few steps; for a method with mask phases also compile the step
    that moves the masks (on a copy at the step before its first move: the trainer
    donates its input), so no timed block includes a compilation."""
    _, state = block_time(step, state, batch, 3)
    if method.phases is not None:
        first_move = next(t for t in range(1, 10**7) if method.phases.due(t))
        copy = jax.tree_util.tree_map(jnp.copy, state)
        block_time(step, copy.replace(step=jnp.asarray(first_move - 1, state.step.dtype)),
                   batch, 1)
    return state


def time_steps(models: list[str], methods: list[str], *, block: int = 100, repeats: int = 5,
               amortize: str = "blocks", optax_baseline: bool = False,
               batch_size: int | None = None,
               model_options: dict[str, dict[str, Any]] | None = None,
               deadline: float | None = None) -> list[dict[str, Any]]:
    """One row per (model, method): the method's step time against the dense step's (and
    the user's plain optax step's, with ``optax_baseline``), timed in alternation.
    ``batch_size`` and ``model_options`` (per model) shrink the models for a smoke run;
    past ``deadline`` (``time.monotonic()``) the rows not yet started are skipped."""
    rows = []
    backend = jax.default_backend()
    for model_name in models:
        if deadline is not None and time.monotonic() > deadline:
            print(f"skip {model_name}: past the deadline")
            continue
        loss_fn, params, model_state, batch = setup(
            model_name, batch_size, **(model_options or {}).get(model_name, {}))
        batch_size_used = int(batch["image"].shape[0])
        total = 10**6  # long enough that interval updates keep happening while timed
        dense = build("dense", total)
        dense_step = SingleDeviceTrainer(dense, loss_fn).step
        dense_state = init_state(dense, loss_fn, params, model_state, batch)
        _, dense_state = block_time(dense_step, dense_state, batch, 3)
        steps, states = {"dense": dense_step}, {"dense": dense_state}
        if optax_baseline:
            from own_loop import start, user_step  # own_loop imports this module

            tx = optax.sgd(0.1, momentum=0.9)
            steps["optax"] = user_step(loss_fn, tx)
            _, states["optax"] = block_time(steps["optax"], start(tx, params, model_state),
                                            batch, 3)
        for name in methods:
            if VARIANTS.get(name, name) not in sparsejax.METHODS:
                print(f"skip {name}: not registered")
                continue
            if deadline is not None and time.monotonic() > deadline:
                print(f"skip {model_name} {name}: past the deadline")
                continue
            method = build(name, total)
            step = SingleDeviceTrainer(method, loss_fn).step
            state = warm_up(step, method, init_state(method, loss_fn, params, model_state,
                                                      batch), batch)
            medians, timed = interleaved_medians(
                {**steps, name: step}, {**states, name: state}, batch, block, repeats)
            state = timed.pop(name)
            states.update(timed)
            interval = METHOD_OPTIONS[name].get("update_every")
            row = {"method": name, "model": model_name, "batch_size": batch_size_used,
                   "dense_ms": round(medians["dense"], 4),
                   "method_ms": round(medians[name], 4),
                   "update_interval": interval, "amortize": amortize, **host()}
            if interval and amortize == "separate":
                if int(state.step) >= interval:  # an update fell inside a timed block
                    raise SystemExit("--amortize separate needs blocks free of updates: "
                                     "use fewer --repeats/--block steps than the interval")
                before_update = state.replace(step=jnp.asarray(
                    (int(state.step) // interval + 1) * interval - 1, state.step.dtype))
                update_ms, _ = block_time(step, before_update, batch, 1)
                row["step_ms"] = row["method_ms"]
                row["update_ms"] = round(update_ms, 4)
                row["method_ms"] = round(
                    ((interval - 1) * row["step_ms"] + update_ms) / interval, 4)
            row["ratio"] = round(row["method_ms"] / row["dense_ms"], 3)
            if "optax" in medians:
                row["optax_dense_ms"] = round(medians["optax"], 4)
                row["ratio_to_optax"] = round(row["method_ms"] / row["optax_dense_ms"], 3)
            rows.append(row)
            print(f"{backend} {model_name:9s} {name:18s} dense {row['dense_ms']:8.3f} ms  "
                  f"method {row['method_ms']:8.3f} ms  ratio {row['ratio']:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHOD_OPTIONS
                                                         if m != "dense"])
    parser.add_argument("--block", type=int, default=100, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amortize", choices=("blocks", "separate"), default="blocks",
                        help="time interval updates inside blocks of N steps, or apart")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--optax-baseline", action="store_true",
                        help="also time the user's plain optax dense step of each model")
    parser.add_argument("--other-load", default="not recorded",
                        help="what else ran on the machine, recorded in every row")
    args = parser.parse_args()

    rows = time_steps(args.models, args.methods, block=args.block, repeats=args.repeats,
                      amortize=args.amortize, optax_baseline=args.optax_baseline)
    write_json(args.json, [{**row, "other_load": args.other_load} for row in rows])


if __name__ == "__main__":
    main()
