"""Where the relaxed Bernoulli gates' train step spends its time beyond dense: the same
step with parts of the method taken away, one at a time, against the dense step of the
same model, timed interleaved in one process as ``step_time.py`` does.

Variants (Gaussian gate, SGD with momentum, as in ``step_time.py``):

* ``gates``: the method as ``step_time.py`` times it (90% target sparsity);
* ``no_noise``: the gate noise replaced by zeros (no random numbers drawn);
* ``no_noise_penalty``: and the penalty ``lam * mean Phi(mu / sigma)`` replaced by 0;
* ``no_noise_penalty_controller``: and no target sparsity (no controller: no count of
  open gates after each update).

What is left in the last one is the gating itself (``w * clip(mu, 0, 1)``, its gradient)
and the optimizer on the gate parameters, which replaces dense's optimizer on the
weights. The variants are ablations for measurement only: they are not methods.

    python benchmarks/gates_breakdown.py --models lenet300 --json out.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import (  # noqa: E402
    MODELS,
    host,
    init_state,
    interleaved_medians,
    setup,
    warm_up,
    write_json,
)
from step_time import build as build_method  # noqa: E402

import sparsejax  # noqa: E402
import sparsejax.methods.gates as gates_module  # noqa: E402
from sparsejax.engine.parallel import SingleDeviceTrainer  # noqa: E402

VARIANTS = ("gates", "no_noise", "no_noise_penalty", "no_noise_penalty_controller")


def build(variant: str) -> sparsejax.Method:
    """The method of ``variant``: ``dense`` and ``gates`` exactly as ``step_time.py``
    builds them, the others the same gates with parts taken away."""
    total_steps = 10**6
    if variant in ("dense", "gates"):
        return build_method(variant, total_steps)
    real_form = gates_module.gaussian_gate

    def noiseless(*args: Any, **kwargs: Any) -> gates_module.GateForm:
        return real_form(*args, **kwargs)._replace(
            noise=lambda key, shape: jnp.zeros(shape, jnp.float32))

    with mock.patch.object(gates_module, "gaussian_gate", noiseless):
        if variant.endswith("controller"):  # no target sparsity, a fixed lam (unused)
            method = sparsejax.gates(optax.sgd(0.1, momentum=0.9), lam=0.0)
        else:
            method = build_method("gates", total_steps)
    if "penalty" in variant:
        method = method._replace(penalty=lambda state, scores: jnp.float32(0.0))
    return method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet300"], choices=list(MODELS))
    parser.add_argument("--block", type=int, default=100, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for model_name in args.models:
        loss_fn, params, model_state, batch = setup(model_name)
        steps, states = {}, {}
        for variant in ("dense", *VARIANTS):
            method = build(variant)
            steps[variant] = SingleDeviceTrainer(method, loss_fn).step
            states[variant] = warm_up(steps[variant], method, init_state(
                method, loss_fn, params, model_state, batch), batch)
        medians, _ = interleaved_medians(steps, states, batch, args.block, args.repeats)
        dense_ms = medians["dense"]
        for variant in VARIANTS:
            method_ms = medians[variant]
            row = {"model": model_name, "variant": variant,
                   "batch_size": MODELS[model_name][1], "dense_ms": round(dense_ms, 4),
                   "method_ms": round(method_ms, 4), "ratio": round(method_ms / dense_ms, 3),
                   **host()}
            rows.append(row)
            print(f"{row['backend']} {model_name:9s} {variant:28s} dense {dense_ms:8.3f} ms  "
                  f"method {method_ms:8.3f} ms  ratio {row['ratio']:.3f}", flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
