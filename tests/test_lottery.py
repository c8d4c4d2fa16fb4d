"""The lottery driver: IMP masks per round, rewinding (to init and late), controls, cached
reruns, resume after SIGKILL, and instability analysis."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.core.masks import default_prunable
from sparsejax.core.transforms import zero_masked
from sparsejax.harness.cli import main
from sparsejax.harness.lottery import (
    LotteryConfig,
    Trainer,
    config_hash,
    imp_masks,
    instability,
    parse_step,
    round_counts,
    run_lottery,
)
from sparsejax.harness.lottery import same_counts_random_mask as _same_counts_random_mask
from sparsejax.io.checkpoint import Checkpointer

TINY = dict(dataset="mnist1d", model="lenet300", batch_size=64, controls=())


def fake_params(seed=0):
    key = jax.random.PRNGKey(seed)
    shapes = {"fc1": (20, 30), "fc2": (30, 10), "head": (10, 5)}
    params = {}
    for i, (name, shape) in enumerate(shapes.items()):
        params[name] = {"kernel": jax.random.normal(jax.random.fold_in(key, i), shape),
                        "bias": jnp.ones(shape[1])}
    return params


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_parse_step_errors():
    assert parse_step("3ep", 62) == 186
    with pytest.raises(ValueError, match="500it"):
        parse_step("3 epochs", 62)


def test_imp_masks_layerwise_with_output_rate():
    config = LotteryConfig(epochs=1, prune_fraction=0.2, output_fraction=0.1)
    params = fake_params()
    masks = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)
    for r in range(1, 6):
        # Perturb the "trained" weights each round; survivors are still chosen by |w|.
        params = jax.tree_util.tree_map(lambda p, r=r: p * (1 + 0.1 * r), fake_params(r))
        new = imp_masks(config, params, masks, r)
        for layer in ("fc1", "fc2", "head"):
            n = params[layer]["kernel"].size
            rate = 0.1 if layer == "head" else 0.2
            kept = np.asarray(new[layer]["kernel"])
            old = np.asarray(masks[layer]["kernel"])
            assert kept.sum() == round_counts(n, rate, r)
            assert not (kept & ~old).any()  # nested: nothing revived
            w = np.abs(np.asarray(params[layer]["kernel"]))
            pruned_now = old & ~kept
            assert w[kept].min() >= w[pruned_now].max()  # smallest survivors pruned
            assert np.asarray(new[layer]["bias"]).all()
        masks = new


def test_imp_masks_global_with_dense_output():
    config = LotteryConfig(epochs=1, distribution="global", output_fraction=0)
    params = fake_params()
    masks = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)
    new = imp_masks(config, params, masks, 3)
    assert np.asarray(new["head"]["kernel"]).all()
    pooled = [np.asarray(new[k]["kernel"]) for k in ("fc1", "fc2")]
    weights = [np.abs(np.asarray(params[k]["kernel"])) for k in ("fc1", "fc2")]
    assert sum(m.sum() for m in pooled) == round_counts(900, 0.2, 3)
    kept_min = min(w[m].min() for w, m in zip(weights, pooled, strict=True))
    pruned_max = max(w[~m].max() for w, m in zip(weights, pooled, strict=True))
    assert kept_min >= pruned_max
    assert config_hash(config) != config_hash(LotteryConfig(epochs=1))


def test_random_mask_control_keeps_each_layers_count():
    params = fake_params()
    masks = imp_masks(LotteryConfig(epochs=1), params,
                      jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params), 4)
    random = _same_counts_random_mask(masks, jax.random.PRNGKey(7), default_prunable)
    for layer in ("fc1", "fc2", "head"):
        a, b = np.asarray(masks[layer]["kernel"]), np.asarray(random[layer]["kernel"])
        assert a.sum() == b.sum()
        assert (a != b).any()


@pytest.fixture(scope="module")
def lottery_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lottery")
    config = LotteryConfig(steps=20, rounds=2, out_root=str(root),
                           **{**TINY, "controls": ("reinit", "random_mask")})
    trainer = Trainer(config)
    summary = run_lottery(config, verbose=False, trainer=trainer)
    return config, trainer, summary


def test_lottery_rounds_rewind_to_init_and_controls(lottery_run):
    config, trainer, summary = lottery_run
    folder = Path(summary["folder"])
    assert folder.name == config_hash(config)
    densities = [r["density"] for r in summary["rounds"]]
    assert densities[0] == 1.0
    report = json.loads((folder / "round_02" / "ticket" / "result.json").read_text())
    for layer in report["layers"]:
        rate = 0.1 if layer["path"].startswith("head") else 0.2
        assert layer["kept"] == round_counts(layer["size"], rate, 2)
    assert "total (prunable)" in report["report"]
    assert {"reinit", "random_mask"} <= set(summary["rounds"][1])

    # The round-1 ticket is w_0 under the round-1 mask, trained like round 0.
    init = trainer.initial_state()
    with Checkpointer(folder / "round_01" / "ticket" / "checkpoints") as c:
        _, ticket, _ = c.restore(init)
    start = init.replace(params=zero_masked(init.params, ticket.masks), masks=ticket.masks)
    assert_bitwise_equal(trainer.train(start, trainer.total_steps).params, ticket.params)
    # The reinit control has the same mask but other weights.
    with Checkpointer(folder / "round_01" / "reinit" / "checkpoints") as c:
        _, reinit, _ = c.restore(init)
    assert_bitwise_equal(reinit.masks, ticket.masks)
    assert not np.array_equal(np.asarray(reinit.params["fc1"]["kernel"]),
                              np.asarray(ticket.params["fc1"]["kernel"]))

    # A rerun finds every result and trains nothing.
    stamp = (folder / "round_02" / "ticket" / "result.json").stat().st_mtime_ns
    again = run_lottery(config, verbose=False, trainer=trainer)
    assert again["rounds"] == summary["rounds"]
    assert (folder / "round_02" / "ticket" / "result.json").stat().st_mtime_ns == stamp


def test_late_rewinding_continues_schedule_and_data_order(tmp_path):
    config = LotteryConfig(steps=30, rounds=1, rewind="10it", out_root=str(tmp_path),
                           lr_schedule="cosine", **TINY)
    trainer = Trainer(config)
    summary = run_lottery(config, verbose=False, trainer=trainer)
    folder = Path(summary["folder"])
    init = trainer.initial_state()
    with Checkpointer(folder / "rewind") as c:
        step, rewind_state, _ = c.restore(init)
    assert step == 10 == int(rewind_state.step)
    # Continuing the recorded w_k (with its optimizer state) reproduces the dense run.
    with Checkpointer(folder / "round_00" / "ticket" / "checkpoints") as c:
        _, dense, _ = c.restore(init)
    assert_bitwise_equal(trainer.train(rewind_state, 30).params, dense.params)
    # Round 1 restarts from w_k under its mask at step 10.
    with Checkpointer(folder / "round_01" / "ticket" / "checkpoints") as c:
        _, ticket, _ = c.restore(init)
    start = rewind_state.replace(params=zero_masked(rewind_state.params, ticket.masks),
                                 masks=ticket.masks)
    assert_bitwise_equal(trainer.train(start, 30).params, ticket.params)


@pytest.mark.slow  # 28 s; the loop's own SIGKILL resume test runs by default
def test_killed_lottery_resumes_at_round_and_step(tmp_path):
    common = ["lottery", "--dataset", "mnist1d", "--steps", "124", "--batch-size", "64",
              "--rounds", "2", "--controls", "none"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sparsejax.harness.cli", *common, "--out-root",
                             str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if list(killed.glob("*/round_01/ticket/checkpoints/step_*")):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dirs = list(killed.glob("*"))
    assert run_dirs and not (run_dirs[0] / "summary.json").exists(), "killed too late"
    assert list(run_dirs[0].glob("round_01/ticket/checkpoints/step_*"))
    assert not (run_dirs[0] / "round_01" / "ticket" / "result.json").exists()

    assert main([*common, "--out-root", str(killed)]) == 0
    reference = tmp_path / "reference"
    assert main([*common, "--out-root", str(reference)]) == 0
    a = json.loads((run_dirs[0] / "summary.json").read_text())
    b = json.loads(next(reference.glob("*/summary.json")).read_text())
    assert a["rounds"] == b["rounds"]
    trainer_config = LotteryConfig(steps=124, **TINY)
    template = Trainer(trainer_config).initial_state()
    states = []
    for root in (run_dirs[0], next(reference.glob("*/summary.json")).parent):
        with Checkpointer(root / "round_02" / "ticket" / "checkpoints") as c:
            states.append(c.restore(template)[1])
    assert_bitwise_equal(states[0], states[1])


def test_instability_reports_barrier_of_the_path(tmp_path):
    config = LotteryConfig(steps=62, rounds=0, out_root=str(tmp_path), **TINY)
    trainer = Trainer(config)
    result = instability(config, 0, data_seeds=(5, 6), num_alphas=3, trainer=trainer)
    errors = result["errors"]
    assert len(errors) == 3 and result["alphas"] == [0.0, 0.5, 1.0]
    assert result["barrier"] == pytest.approx(max(errors) - 0.5 * (errors[0] + errors[-1]))
    folder = Path(tmp_path) / config_hash(config) / "instability" / "round_00_seeds_5_6"
    init = trainer.initial_state()
    copies = []
    for seed in (5, 6):
        with Checkpointer(folder / f"copy_{seed}" / "checkpoints") as c:
            copies.append(c.restore(init)[1])
    assert errors[0] == pytest.approx(1 - trainer.accuracy(copies[0]))
    assert errors[-1] == pytest.approx(1 - trainer.accuracy(copies[1]))
    # Different data orders give different endpoints.
    assert not np.array_equal(np.asarray(copies[0].params["fc1"]["kernel"]),
                              np.asarray(copies[1].params["fc1"]["kernel"]))
