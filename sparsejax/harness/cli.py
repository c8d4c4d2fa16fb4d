"""The ``sparsejax`` command line: train, plot, lottery, instability, export-ticket,
evaluate-ticket, demo, prune, launch."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main", "build_parser", "train_config"]

Handler = Callable[[argparse.Namespace], int]

# Modules that add subcommands: each has ``add_commands(subparsers) -> {name: handler}``.
_COMMAND_MODULES = ("sparsejax.harness.lottery.commands", "sparsejax.harness.tickets",
                    "sparsejax.harness.demo",
                    "sparsejax.harness.prune_run", "sparsejax.harness.launch")


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (numbers, true/false, lists), else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The argument parser and the handler of each subcommand."""
    from sparsejax.core.distributions import DISTRIBUTIONS
    from sparsejax.engine.parallel import PARALLEL_MODES
    from sparsejax.harness.data import DATASET_NAMES
    from sparsejax.harness.models import MODEL_NAMES
    from sparsejax.harness.training.config import KEEP_BEST
    from sparsejax.harness.training.optim import LR_SCHEDULES, OPTIMIZERS
    from sparsejax.harness.training.recipes import RECIPE_CHOICES
    from sparsejax.methods import METHODS

    parser = argparse.ArgumentParser(prog="sparsejax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model with one method")
    train.add_argument("--method", default="dense", help=f"one of: {', '.join(sorted(METHODS))}")
    train.add_argument("--model", default="lenet300", help=f"one of: {', '.join(MODEL_NAMES)}")
    train.add_argument("--dataset", default="mnist1d",
                       help=f"one of: {', '.join(DATASET_NAMES)} (mnist1d is generated locally)")
    train.add_argument("--data-dir", default=None,
                       help="folder with the dataset (MNIST IDX files, tinyshakespeare's "
                            "input.txt, or a TFDS data dir)")
    train.add_argument("--sparsity", type=float, default=None,
                       help="fraction of prunable weights removed, in [0, 1)")
    train.add_argument("--allow-empty-layers", action="store_true",
                       help="train even when the sparsity keeps no weight in some prunable "
                            "layer (refused by default)")
    train.add_argument("--distribution", default=None,
                       help=f"layer-wise sparsity: {', '.join(DISTRIBUTIONS)}")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None,
                        help="epochs to train (default: the recipe's, else 1, when --steps "
                             "is not given)")
    length.add_argument("--steps", type=int, default=None,
                        help="training steps (batches), instead of --epochs")
    train.add_argument("--recipe", default="auto", choices=RECIPE_CHOICES,
                       help="auto (default): options not given take the method's recorded "
                            "recipe for the model's family (result.json says which value "
                            "came from where); none: library defaults only")
    train.add_argument("--batch-size", type=int, default=None,
                       help="examples per training step (recipe, else 128)")
    train.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                       help="the optax optimizer (recipe, else sgd)")
    train.add_argument("--lr", type=float, default=None,
                       help="peak learning rate, finite (recipe, else 0.1)")
    train.add_argument("--momentum", type=float, default=None,
                       help="momentum of sgd and nesterov, finite, 0: none (recipe, else 0.9)")
    train.add_argument("--weight-decay", type=float, default=None,
                       help="L2 weight decay, finite (recipe, else 0)")
    train.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                       help="learning-rate schedule over the run (recipe, else cosine); "
                            "step: x0.1 every --lr-decay-every steps")
    train.add_argument("--lr-decay-every", type=int, default=0,
                       help="with --lr-schedule step: steps between the x0.1 decays, >= 1")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the weights, data order and method, in [0, 2**32 - 1]")
    train.add_argument("--eval-every", type=int, default=0,
                       help="steps between test evaluations, >= 0; 0: once per epoch")
    train.add_argument("--log-every", type=int, default=50, help="steps between metric lines, >= 1")
    train.add_argument("--checkpoint-every", type=int, default=0,
                       help="steps between checkpoints, >= 0; 0: once per epoch")
    train.add_argument("--keep-checkpoints", type=int, default=3,
                       help="newest checkpoints kept in --out")
    train.add_argument("--keep-best", choices=tuple(KEEP_BEST),
                       default=None,
                       help="keep the --keep-checkpoints best checkpoints by this held-out "
                            "metric (and the newest), instead of the newest; needs "
                            "--validation-size")
    train.add_argument("--out", default=None, help="output folder (default: runs/<config>)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest good checkpoint in --out")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its result, metrics and "
                            "checkpoints) instead of refusing to start")
    train.add_argument("--no-progress", dest="progress", action="store_false",
                       help="do not show the progress bar")
    train.add_argument("--parallel", default="none", choices=PARALLEL_MODES,
                       help="data parallelism: pmap or sharded jit over all devices")
    train.add_argument("--nonfinite", default="error", choices=("error", "skip"),
                       help="a NaN/inf loss or gradient stops the run (error) or the step "
                            "is skipped and counted (skip)")
    train.add_argument("--max-skipped-fraction", type=float, default=0.5,
                       help="with --nonfinite skip: the run fails (exit code 2, result.json "
                            "kept) if more than this share of its steps were skipped, in [0, 1]")
    train.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                       help="do not write TensorBoard events (written where tensorboardX "
                            "is installed)")
    train.add_argument("--init-batches", type=int, default=1,
                       help="training batches that SNIP/GraSP score on at init, >= 0")
    train.add_argument("--validation-size", type=int, default=0,
                       help="training examples held out (a fixed seeded choice) and "
                            "evaluated beside the test set, >= 0; 0: none held out")
    train.add_argument("--bn-recalibration-batches", type=int, default=40,
                       help="the gates on a model with batch norm are evaluated with batch-norm "
                            "statistics recomputed for the binary mask over this many "
                            "training batches, >= 0; 0: with training's running averages")
    train.add_argument("--model-option", dest="model_options", type=_option, action="append",
                       default=[], metavar="KEY=VALUE",
                       help="an option of the model, e.g. use_bias=false (repeatable)")
    train.add_argument("--method-option", dest="method_options", type=_option,
                       action="append", default=[], metavar="KEY=VALUE",
                       help="an option of the method, e.g. update_every=100 (repeatable)")

    plot = commands.add_parser("plot", help="accuracy-versus-sparsity PNG from result files")
    plot.add_argument("results", nargs="+",
                      help="result.json files or folders holding them: sparsejax train runs, "
                           "or a sparsejax lottery run folder (one point per round, a line "
                           "for the tickets and one for each control)")
    plot.add_argument("--output", "-o", default="accuracy_vs_sparsity.png",
                      help="the PNG file to write")
    plot.add_argument("--title", default=None, help="title of the plot")
    handlers: dict[str, Handler] = {"train": _train, "plot": _plot}
    for module in _COMMAND_MODULES:
        handlers.update(importlib.import_module(module).add_commands(commands))
    return parser, handlers


def train_config(args: argparse.Namespace) -> Any:
    """The :class:`~sparsejax.harness.training.loop.TrainConfig` that ``sparsejax train`` runs for
    the parsed ``args`` (its training fields still unresolved: the recipe fills them)."""
    from sparsejax.harness.training.loop import TrainConfig

    fields = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["model_options"] = dict(args.model_options)
    values["method_options"] = dict(args.method_options)
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> int:
    import warnings

    from sparsejax.core.distributions import EmptyLayersWarning
    from sparsejax.harness.training.loop import train
    from sparsejax.harness.training.stops import stop_on_signals

    config = train_config(args)
    _print_recipe(config)
    # SIGINT and SIGTERM stop the run between two steps (RunStopped, in main)
    with stop_on_signals(), warnings.catch_warnings():
        if not args.allow_empty_layers:
            warnings.filterwarnings("error", category=EmptyLayersWarning)
        try:
            result = train(config)
        except EmptyLayersWarning as empty:
            raise ValueError(f"{empty}; or pass --allow-empty-layers to train it anyway"
                             ) from None
    print(
        f"{result['method']} {result['model']} {result['dataset']}: "
        f"test accuracy {100 * result['test_accuracy']:.2f}% at sparsity "
        f"{100 * result['sparsity']:.2f}% after {result['steps']} steps "
        f"({result['wall_seconds']:.1f} s); result in "
        f"{config.out or config.default_out()}/result.json"
    )
    return 0


def _print_recipe(config: Any) -> None:
    """One stderr line naming the preset values the run takes from its recipe."""
    from sparsejax.harness.training.recipes import recipe_for, resolve_recipe

    effective, sources = resolve_recipe(config)
    taken = [key for key, source in sources.items() if source.startswith("recipe")]
    if not taken:
        return
    recipe = recipe_for(effective.method, effective.model)
    assert recipe is not None
    shown = []
    for key in taken:
        field, _, option = key.partition(".")
        value = getattr(effective, field)[option] if option else getattr(effective, field)
        shown.append(f"{option or field}={value}")
    print(f"recipe {recipe.name} ({recipe.source}): {', '.join(shown)}; options given on "
          "the command line win, --recipe none uses library defaults", file=sys.stderr)


def _plot(args: argparse.Namespace) -> int:
    from sparsejax.harness.plotting import EXPECTED, load_results, plot_accuracy_vs_sparsity

    results = load_results(args.results)
    if not results:
        raise ValueError(f"nothing to plot in {', '.join(args.results)}: expected {EXPECTED}")
    path = plot_accuracy_vs_sparsity(results, args.output, args.title)
    print(f"wrote {path}")
    return 0


def _checkpoint_error() -> type[Exception]:
    """sparsejax.io.checkpoint's error (a failed save, no usable checkpoint), imported only
    when needed: orbax is slow to import."""
    from sparsejax.io.checkpoint import CheckpointError

    return CheckpointError


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the ``sparsejax train`` run of ``argv``: the same
    options, ``--resume`` added and ``--overwrite`` (which would delete the checkpoints
    to resume from, and which --resume refuses) taken out, quoted for a shell."""
    # argparse takes any unambiguous prefix of a flag: --overw is --overwrite
    words = [w for w in argv if not (len(w) >= 4 and "--overwrite".startswith(w))]
    if not any(len(w) >= 5 and "--resume".startswith(w) for w in words):
        words.append("--resume")
    return shlex.join(["sparsejax", *words])


def _stopped(command: str, argv: Sequence[str], stop: Any) -> int:
    """One line for a run that stopped early (sparsejax.harness.training.stops.RunStopped): what
    stopped it, the step saved and, for ``train``, the command that resumes it."""
    how = f"resume with: {resume_command(argv)}" if command == "train" else None
    print(f"sparsejax {command}: {stop.describe(how)}", file=sys.stderr)
    return stop.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsejax`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in argv if not w.startswith("-")), "")
    try:
        parser, handlers = build_parser()
        args = parser.parse_args(argv)
        return _run(handlers[args.command], args, argv)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (imports, other commands)
        program = f"sparsejax {command}" if command else "sparsejax"
        print(f"{program}: interrupted by "
              "SIGINT (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(handler: Handler, args: argparse.Namespace, argv: Sequence[str]) -> int:
    from sparsejax.harness.training.stops import RunStopped

    try:
        return handler(args)
    except RunStopped as stop:
        return _stopped(args.command, argv, stop)
    except (ValueError, TypeError, OSError, FloatingPointError,
            _checkpoint_error()) as e:  # (evaluated only when an exception arrives)
        # OSError: a full disk, a folder that cannot be written (its message names the file)
        print(f"sparsejax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        # A missing optional extra (sparsejax.harness._extras.require names its pip install line);
        # a module missing for any other reason is a broken install: keep its traceback.
        if isinstance(e, ModuleNotFoundError):
            raise
        print(f"sparsejax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
