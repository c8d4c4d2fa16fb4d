"""The ``sparsejax lottery`` and ``sparsejax instability`` subcommands: their options (one
per :class:`~sparsejax.harness.lottery.config.LotteryConfig` field), the config they give
(:func:`config_from_args`) and :func:`add_commands`, which ``sparsejax.harness.cli``
calls.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from sparsejax.core.patterns import as_pattern
from sparsejax.harness.lottery.config import CONTROLS, LotteryConfig
from sparsejax.harness.lottery.driver import run_lottery
from sparsejax.harness.lottery.stability import instability

__all__ = ["config_from_args", "add_commands"]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    d = LotteryConfig()
    parser.add_argument("--model", default=d.model, help="the model, as in sparsejax train")
    parser.add_argument("--dataset", default=d.dataset, help="the dataset, as in sparsejax train")
    parser.add_argument("--data-dir", default=None, help="folder with the dataset")
    parser.add_argument("--rounds", type=int, default=d.rounds,
                        help="pruning rounds after the dense round 0")
    parser.add_argument("--prune-fraction", type=float, default=d.prune_fraction,
                        help="fraction of surviving weights removed per round")
    parser.add_argument("--output-fraction", default=str(d.output_fraction),
                        help="the output layer's fraction per round; 'same' or 0 (dense)")
    parser.add_argument("--output-layer", default=d.output_layer,
                        help="name (path prefix) of the output layer, for --output-fraction")
    parser.add_argument("--distribution", default=d.distribution, choices=("uniform", "global"),
                        help="prune each layer alike (uniform) or by one global threshold")
    parser.add_argument("--rewind", default=d.rewind, help="rewind step: 0, 500it or 2ep")
    parser.add_argument("--controls", default=",".join(d.controls),
                        help=f"comma-separated, from: {', '.join(CONTROLS)} (or 'none')")
    parser.add_argument("--control-rounds", type=int, nargs="*", default=None,
                        help="rounds that get the controls, each in [1, --rounds] "
                             "(default: all)")
    parser.add_argument("--pattern", default=d.pattern,
                        help="sparsity pattern of every round: unstructured, N:M (the "
                             "rounds step N down to it), block:B or channel")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=int, default=None, help="epochs per round")
    length.add_argument("--steps", type=int, default=None, help="steps per round")
    parser.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="examples per training step")
    parser.add_argument("--optimizer", default=d.optimizer, help="sgd, nesterov or adam")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=d.momentum,
                        help="momentum of sgd and nesterov")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay,
                        help="L2 weight decay")
    parser.add_argument("--lr-schedule", default=d.lr_schedule, choices=("constant", "cosine"),
                        help="learning-rate schedule of each round")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the weights, data order and controls")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help="the run folder (as in sparsejax train); default: "
                            "OUT_ROOT/<model>_<dataset>_<hash of the settings>")
    where.add_argument("--out-root", default=d.out_root,
                       help="folder of the runs, one subfolder per config, when --out is "
                            f"not given (default {d.out_root})")


def config_from_args(args: argparse.Namespace) -> LotteryConfig:
    output = args.output_fraction
    controls = () if args.controls in ("", "none") else tuple(args.controls.split(","))
    config = LotteryConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, rounds=args.rounds,
        prune_fraction=args.prune_fraction,
        output_fraction=None if output in ("same", "None") else float(output),
        output_layer=args.output_layer, distribution=args.distribution, rewind=args.rewind,
        controls=controls, control_rounds=None if args.control_rounds is None
        else tuple(args.control_rounds), pattern=str(as_pattern(args.pattern)),
        epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, seed=args.seed,
        out_root=args.out_root, out=args.out)
    config.check()
    return config


def _lottery_command(args: argparse.Namespace) -> int:
    summary = run_lottery(config_from_args(args))
    print(json.dumps(summary["rounds"], indent=1))
    print(f"results in {summary['folder']}")
    return 0


def _instability_command(args: argparse.Namespace) -> int:
    result = instability(config_from_args(args), args.round,
                         data_seeds=tuple(args.data_seeds), num_alphas=args.alphas)
    print(f"round {result['round']} rewind step {result['rewind_step']}: barrier "
          f"{100 * result['barrier']:.2f} pp; errors "
          + " ".join(f"{e:.4f}" for e in result["errors"]))
    return 0


def add_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``lottery`` and ``instability`` to the ``sparsejax`` parser; returns handlers."""
    lottery = commands.add_parser("lottery", help="iterative magnitude pruning with rewinding")
    _add_config_arguments(lottery)
    stability = commands.add_parser(
        "instability", help="linear mode connectivity of two copies from the rewind point")
    _add_config_arguments(stability)
    stability.add_argument("--round", type=int, default=0, help="whose masks (0: dense)")
    stability.add_argument("--data-seeds", type=int, nargs=2, default=[101, 102],
                           help="data orders of the two copies")
    stability.add_argument("--alphas", type=int, default=11,
                           help="points on the line between the copies, ends included, >= 2")
    return {"lottery": _lottery_command, "instability": _instability_command}
