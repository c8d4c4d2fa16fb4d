"""The optax form in a user's own loop against that loop's plain optax dense step.

The baseline is what a user runs before adding sparsejax: ``value_and_grad`` of their
loss, ``tx.update`` of a plain ``optax.sgd(0.1, momentum=0.9)`` and
``optax.apply_updates``, jitted with the carry donated. The sparse rows run the very same
function with ``tx = sparsejax.sparse_tx(method, optax.sgd(0.1, momentum=0.9), ...)``.
Both are compiled, warmed up and timed in alternation in this one process
(``step_time.interleaved_medians``).

RigL moves its masks every ``update_every`` steps inside the same compiled step (a
``lax.cond``: the optax form has no host-side phases). ``--amortize blocks`` times blocks
that are a multiple of the interval, so each holds its share of updates;
``--amortize separate`` (ResNet-18 on CPU, where 100-step blocks take minutes) times
blocks free of updates and one update step on its own, and reports
``((N - 1) * step + update) / N``.

With ``--nnx`` the NNX rows compare Edge-Popup on an NNX LeNet-300-100
(``sparsejax.nnx``: frozen kernels, trainable scores, ``nnx.Optimizer(..., wrt=Score)``)
against the same NNX model trained densely with ``nnx.Optimizer(..., wrt=nnx.Param)``.

    python benchmarks/own_loop.py --models lenet300 --json benchmarks/results/own_loop_lenet300.json
    python benchmarks/own_loop.py --models resnet18 --block 3 --repeats 3 --amortize separate
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import MODELS, block_time, host, interleaved_medians, setup, write_json  # noqa: E402

import sparsejax  # noqa: E402

OPTIONS = {"static": {"sparsity": 0.9},
           "rigl": {"sparsity": 0.9, "update_every": 100, "total_steps": 10**6}}


def user_step(loss_fn: Any, tx: optax.GradientTransformation):
    """The user's own compiled step: ``(params, model_state, opt_state), batch ->
    (carry, loss)``; the same code for the dense baseline and every sparse row."""

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(carry: Any, batch: Any) -> tuple[Any, jax.Array]:
        params, model_state, opt_state = carry
        (loss, (model_state, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), model_state, opt_state), loss

    return step


def start(tx: optax.GradientTransformation, params: Any, model_state: Any) -> Any:
    opt_state = tx.init(params)
    if any(isinstance(x, sparsejax.SparseTxState) for x in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: isinstance(x, sparsejax.SparseTxState))):
        params = sparsejax.zero_pruned(params, opt_state)
    return jax.tree_util.tree_map(jnp.copy, (params, model_state, opt_state))


def with_step(carry: Any, step: int) -> Any:
    params, model_state, opt_state = carry
    return params, model_state, opt_state._replace(step=jnp.asarray(step, jnp.int32))


def optax_rows(model_name: str, methods: list[str], block: int, repeats: int,
               amortize: str) -> list[dict[str, Any]]:
    loss_fn, params, model_state, batch = setup(model_name)
    dense_tx = optax.sgd(0.1, momentum=0.9)
    dense_step = user_step(loss_fn, dense_tx)
    dense = start(dense_tx, params, model_state)
    _, dense = block_time(dense_step, dense, batch, 3)
    rows = []
    for name in methods:
        tx = sparsejax.sparse_tx(name, optax.sgd(0.1, momentum=0.9), **OPTIONS[name])
        step = user_step(loss_fn, tx)
        carry = start(tx, params, model_state)
        _, carry = block_time(step, carry, batch, 3)
        interval = OPTIONS[name].get("update_every")
        medians, states = interleaved_medians({"dense": dense_step, name: step},
                                              {"dense": dense, name: carry}, batch, block,
                                              repeats)
        dense, carry = states["dense"], states[name]
        row = {"method": name, "form": "sparse_tx", "model": model_name,
               "batch_size": MODELS[model_name][1],
               "dense_ms": round(medians["dense"], 4), "method_ms": round(medians[name], 4),
               "update_interval": interval, "amortize": amortize if interval else None,
               "baseline": "the user's plain optax step: sgd(0.1, momentum=0.9)", **host()}
        if interval and amortize == "separate":
            steps_done = int(carry[2].step)
            if steps_done >= interval:
                raise SystemExit("--amortize separate needs blocks free of updates")
            # The first update step warms the branch up; the second is timed.
            _, carry = block_time(step, with_step(carry, interval - 1), batch, 1)
            update_ms, _ = block_time(step, with_step(carry, 2 * interval - 1), batch, 1)
            row.update(step_ms=row["method_ms"], update_ms=round(update_ms, 4),
                       method_ms=round(((interval - 1) * row["method_ms"] + update_ms)
                                       / interval, 4))
        elif interval and block % interval:
            raise SystemExit(f"--block must be a multiple of {interval} with --amortize blocks")
        row["ratio"] = round(row["method_ms"] / row["dense_ms"], 4)
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "resnet18"])
    parser.add_argument("--methods", nargs="+", default=list(OPTIONS))
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--amortize", choices=("blocks", "separate"), default="blocks")
    parser.add_argument("--nnx", action="store_true", help="also the NNX Edge-Popup row")
    parser.add_argument("--other-load", default="none",
                        help="what else ran on the machine, recorded in every row")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for model_name in args.models:
        rows += optax_rows(model_name, args.methods, args.block, args.repeats, args.amortize)
    if args.nnx:
        from nnx_rows import nnx_edge_popup_rows

        rows += nnx_edge_popup_rows(args.block, args.repeats)
    for row in rows:
        row["other_load"] = args.other_load
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
