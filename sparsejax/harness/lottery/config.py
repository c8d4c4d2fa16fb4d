"""A lottery run's settings and its run folder: :class:`LotteryConfig` (with its checks),
the controls it may name (:data:`CONTROLS`), rewind steps (:func:`parse_step`), and the
folder a run lives in.

Each run lives in ``OUT_ROOT/<model>_<dataset>_<hash>``, the hash taken over the
hyperparameters that differ from :class:`LotteryConfig`'s defaults (and over none of
``rounds``, ``controls``, ``out_root``, which do not change any round's result), so a
rerun finds every finished round; ``--out FOLDER`` (``LotteryConfig.out``) names the run
folder itself instead, as ``sparsejax train --out`` does. A folder reused with other
settings is refused (:func:`check_same_run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from sparsejax.core.validation import check_writable_folder
from sparsejax.harness.lottery.masks import check_lottery_pattern
from sparsejax.io.files import read_json

__all__ = ["CONTROLS", "parse_step", "LotteryConfig", "config_hash", "run_folder",
           "check_out", "check_same_run"]

CONTROLS = ("reinit", "random_mask")


def parse_step(text: str | int, batches_per_epoch: int) -> int:
    """A step count from ``'500it'``, ``'2ep'`` (epochs of ``batches_per_epoch``) or an int.

    >>> parse_step("500it", 100), parse_step("2ep", 100), parse_step(7, 100)
    (500, 200, 7)
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(it|ep)?\s*", str(text))
        if not match:
            raise ValueError(f"a step is written like '500it' or '2ep', got {text!r}")
        value = int(match.group(1)) * (batches_per_epoch if match.group(2) == "ep" else 1)
    if value < 0:
        raise ValueError(f"a step must be >= 0, got {text!r}")
    return value


@dataclasses.dataclass
class LotteryConfig:
    """An IMP run. The defaults are the paper's LeNet-300-100 setup (Adam 1.2e-3, batch
    60, layer-wise pruning of 20% per round, 10% for the output layer), except the length:
    give ``epochs`` or ``steps`` per round.

    Attributes:
      prune_fraction: fraction of the surviving prunable weights removed each round.
      output_fraction: the same for the output layer (``output_layer``); ``None``: prune
        it like the others; ``0``: leave it dense.
      distribution: ``'uniform'`` (each layer loses ``prune_fraction`` of its survivors)
        or ``'global'`` (one magnitude threshold over the pooled layers).
      rewind: the rewind step, ``'0'`` (to init), ``'500it'`` or ``'2ep'``.
      controls: branches trained each round beside the ticket, from :data:`CONTROLS`.
      control_rounds: the rounds that get the controls (``None``: every round >= 1);
        each must lie in ``[1, rounds]``.
      pattern: the sparsity pattern each round prunes within (:mod:`sparsejax.core.patterns`;
        rules in :mod:`sparsejax.harness.lottery.masks`); hashed only when not ``'unstructured'``.
      out: the run folder itself (``None``: ``out_root/<model>_<dataset>_<hash>``, see
        :func:`run_folder`).
    """

    model: str = "lenet300"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    rounds: int = 18
    prune_fraction: float = 0.2
    output_fraction: float | None = 0.1
    output_layer: str = "head"
    distribution: str = "uniform"
    rewind: str = "0it"
    controls: tuple[str, ...] = ("reinit",)
    control_rounds: tuple[int, ...] | None = None
    pattern: str = "unstructured"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 60
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    seed: int = 0
    out_root: str = "runs/lottery"
    out: str | None = None

    def check(self) -> None:
        """Raise ``ValueError`` for inconsistent settings."""
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of epochs or steps (per round)")
        if not 0 < self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must lie in (0, 1), got {self.prune_fraction}")
        if self.output_fraction is not None and not 0 <= self.output_fraction < 1:
            raise ValueError(f"output_fraction must lie in [0, 1), got {self.output_fraction}")
        if self.distribution not in ("uniform", "global"):
            raise ValueError("distribution must be 'uniform' (layer-wise) or 'global', got "
                             f"{self.distribution!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        outside = [r for r in self.control_rounds or () if not 1 <= r <= self.rounds]
        if outside:  # they used to run no control, exit code 0
            valid = (f"rounds in [1, {self.rounds}]" if self.rounds else
                     "no round (round 0, the dense one, gets no controls)")
            raise ValueError(
                f"--control-rounds {' '.join(map(str, outside))} names round(s) this run does "
                f"not have: --rounds {self.rounds} trains rounds 1 to {self.rounds} after the "
                f"dense round 0, so --control-rounds takes {valid}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ValueError(f"unknown control(s) {unknown}; known: {', '.join(CONTROLS)}")
        check_lottery_pattern(self.pattern, self.prune_fraction, self.output_fraction,
                              self.distribution, self.rounds)


_UNHASHED = ("rounds", "controls", "control_rounds", "out_root", "out", "data_dir")


def config_hash(config: LotteryConfig) -> str:
    """The folder name of a run: model, dataset and a hash of its non-default settings.

    >>> config_hash(LotteryConfig(epochs=2)) == config_hash(LotteryConfig(epochs=2, rounds=3))
    True
    >>> config_hash(LotteryConfig(epochs=2)) == config_hash(LotteryConfig(epochs=3))
    False
    """
    defaults = dataclasses.asdict(LotteryConfig())
    changed = {k: v for k, v in dataclasses.asdict(config).items()
               if k not in _UNHASHED and v != defaults[k]}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.model}_{config.dataset}_{digest}"


def run_folder(config: LotteryConfig) -> Path:
    """The folder of a run: ``config.out`` when given, else
    ``config.out_root/<model>_<dataset>_<hash>``."""
    if config.out is not None:
        return Path(config.out)
    return Path(config.out_root) / config_hash(config)


def check_out(root: Path, config: LotteryConfig) -> None:
    """Raise ``ValueError`` naming the run folder when it cannot be made or written (a
    regular file in its path: ``[Errno 17] File exists`` before)."""
    check_writable_folder(root, "--out" if config.out is not None else "--out-root")


def check_same_run(root: Path, config: LotteryConfig) -> None:
    """Raise ``ValueError`` when ``root`` already holds a lottery run whose results the
    settings of ``config`` would not reproduce (an ``--out`` folder reused with other
    hyperparameters; the hashed folders never collide)."""
    path = root / "config.json"
    if not path.exists():
        return
    stored = read_json(path, "a lottery run's settings")
    try:
        fields = {f.name for f in dataclasses.fields(LotteryConfig)}
        previous = LotteryConfig(**{k: v for k, v in stored.items() if k in fields})
    except (ValueError, TypeError):
        return
    if config_hash(previous) != config_hash(config):
        changed = sorted(k for k in dataclasses.asdict(config)
                         if k not in _UNHASHED and getattr(previous, k) != getattr(config, k))
        raise ValueError(f"{root} holds a lottery run with other settings ({', '.join(changed)}"
                         "); give another --out, or the same settings to continue it")
