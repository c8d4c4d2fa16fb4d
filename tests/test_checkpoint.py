"""Tests of sparsejax.io.checkpoint: bitwise round trips, retention, corruption fallback,
SIGKILL during save, template mismatch."""

from __future__ import annotations

import doctest
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from sparsejax.io import checkpoint, checkpoint_manifest
from sparsejax.io.checkpoint import (
    Checkpointer,
    CorruptCheckpointError,
    NoValidCheckpointError,
    TemplateMismatchError,
)

REPO = Path(__file__).resolve().parents[1]
LOGGER = "sparsejax.io.checkpoint"


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: dict
    masks: dict
    scores: dict
    opt_state: optax.OptState
    key: jax.Array
    batch_stats: dict


TX = optax.sgd(0.1, momentum=0.9)


def make_state(seed: int = 0, step: int = 0) -> TrainState:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed + 100), 3)
    params = {"dense": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jnp.zeros(4)}}
    masks = jax.tree.map(lambda p: jax.random.bernoulli(k2, 0.5, p.shape), params)
    scores = jax.tree.map(lambda p: jax.random.uniform(k3, p.shape), params)
    opt_state = TX.init(params)
    _, opt_state = TX.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    # Values whose bits are easy to lose: -0.0, NaN, inf, a denormal.
    var = jnp.asarray(np.array([-0.0, np.nan, np.inf, 1e-45], np.float32) + seed)
    return TrainState(
        step=jnp.int32(step),
        params=params,
        masks=masks,
        scores=scores,
        opt_state=opt_state,
        key=jax.random.PRNGKey(seed),
        batch_stats={"mean": jnp.full(4, 0.5 + seed), "var": var},
    )


@jax.jit
def train_step(state: TrainState) -> TrainState:
    key, sub = jax.random.split(state.key)
    noise = jax.random.normal(sub, state.params["dense"]["kernel"].shape)
    grads = {"dense": {"kernel": noise, "bias": jnp.ones(4)}}
    grads = jax.tree.map(lambda g, m: g * m, grads, state.masks)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        key=key,
    )


def assert_bitwise_equal(a, b) -> None:
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def warnings_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.fixture
def two_steps(tmp_path):
    """A directory with good checkpoints for steps 1 and 2."""
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, make_state(1, step=1), {"epoch": 0, "batch": 1})
    ckpt.save(2, make_state(2, step=2), {"epoch": 0, "batch": 2})
    ckpt.wait_until_finished()  # the tests damage files behind the Checkpointer's back
    yield ckpt
    ckpt.close()


# --------------------------------------------------------------------------- round trips


def test_round_trip_is_bitwise_and_resume_continues_identically(tmp_path):
    state = train_step(make_state(0, step=7))
    meta = {"epoch": 3, "batch": 17, "config": {"lr": 0.1, "layers": [8, 4]}, "name": "run"}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(8, state, meta)
    assert ckpt.latest_step() == 8 and ckpt.all_steps() == [8]

    for template in (make_state(5), jax.eval_shape(lambda: state)):
        step, restored, restored_meta = ckpt.restore(template)
        assert step == 8
        assert restored_meta == meta
        assert isinstance(restored, TrainState)
        assert_bitwise_equal(restored, state)
        assert restored.step.dtype == jnp.int32
        assert restored.key.dtype == jnp.uint32
        assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(restored.masks))
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
        # A resumed run continues bitwise identically.
        a, b = state, restored
        for _ in range(3):
            a, b = train_step(a), train_step(b)
        assert_bitwise_equal(a, b)


def test_other_leaf_kinds_round_trip(tmp_path):
    state = {
        "f64": np.arange(3.0) / 3,  # numpy stays numpy, 64-bit survives
        "np_scalar": np.float64(2.5),
        "py_int": 2**40,
        "py_float": 0.1,
        "py_bool": True,
        "bf16": jnp.asarray([1.5, -2.25], jnp.bfloat16),
        "typed_key": jax.random.key(3),
        "empty": jnp.zeros((0, 5), jnp.int32),  # orbax cannot store these; we rebuild them
        "tuple": (jnp.uint8(255), [jnp.int16(-3)]),
    }
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(0, state)
        step, restored, meta = ckpt.restore(state)
    assert (step, meta) == (0, {})
    assert type(restored["f64"]) is np.ndarray and restored["f64"].dtype == np.float64
    assert type(restored["np_scalar"]) is np.float64
    assert type(restored["py_int"]) is int and restored["py_int"] == 2**40
    assert type(restored["py_float"]) is float and type(restored["py_bool"]) is bool
    assert jax.dtypes.issubdtype(restored["typed_key"].dtype, jax.dtypes.prng_key)
    assert_bitwise_equal(
        jax.random.key_data(restored["typed_key"]), jax.random.key_data(state["typed_key"])
    )
    plain = {k: v for k, v in state.items() if k != "typed_key"}
    assert_bitwise_equal({k: v for k, v in restored.items() if k != "typed_key"}, plain)


@pytest.mark.multidevice
def test_restore_into_template_sharding(tmp_path):
    """Saved from one device, restored sharded over several: only the template changes."""
    if jax.device_count() < 4:
        pytest.skip("needs >= 4 devices")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    state = make_state(0)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state)
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    row_sharded = NamedSharding(mesh, PartitionSpec("d"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def abstract(x):
        sharding = row_sharded if x.ndim == 2 else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    _, restored, _ = ckpt.restore(jax.tree.map(abstract, state))
    kernel = restored.params["dense"]["kernel"]
    assert kernel.sharding == row_sharded
    assert len(kernel.addressable_shards) == 4
    assert_bitwise_equal(restored, state)


def test_docstring_examples_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = doctest.testmod(checkpoint, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- async


def test_async_save_returns_before_the_write_and_restores_bitwise(tmp_path, monkeypatch):
    """The commit waits on a gate: save() must have returned long before it opens."""
    state, meta = train_step(make_state(3, step=4)), {"batch": 4}
    gate, real = threading.Event(), checkpoint._write_manifest

    def gated(folder, step):
        assert gate.wait(60)
        real(folder, step)

    monkeypatch.setattr(checkpoint, "_write_manifest", gated)
    async_ckpt = Checkpointer(tmp_path / "async", async_save=True)
    async_ckpt.save(4, state, meta)
    assert async_ckpt.step_dirs() == {}  # not committed yet: the write goes on
    pending = tmp_path / "async" / "step_00000004.orbax-checkpoint-tmp"
    deadline = time.monotonic() + 30  # the background thread creates it when it gets to it
    while not pending.is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pending.is_dir() and async_ckpt.step_dirs() == {}  # written, not committed
    gate.set()
    step, restored, restored_meta = async_ckpt.restore(make_state())  # waits for the write
    assert (step, restored_meta) == (4, meta)
    assert_bitwise_equal(restored, state)

    with Checkpointer(tmp_path / "sync") as sync_ckpt:  # synchronous: the default
        sync_ckpt.save(4, state, meta)
        assert list(sync_ckpt.step_dirs()) == [4]  # committed when save returned
        assert_bitwise_equal(sync_ckpt.restore(make_state())[1], restored)
    async_ckpt.close()


def test_a_failed_background_save_is_raised_and_keeps_the_previous_one(two_steps,
                                                                       monkeypatch):
    def full_disk(folder, step):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "_write_manifest", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="save of step 3 .*No space left"):
        two_steps.save(3, make_state(3, step=3))  # synchronous: raised by save itself
    ckpt = Checkpointer(two_steps.directory, async_save=True)
    ckpt.save(3, make_state(3, step=3))  # returns: the failure is in the background
    with pytest.raises(checkpoint.CheckpointError, match="save of step 3 .*No space left"):
        ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.restore(make_state())[0] == 2
    monkeypatch.undo()
    ckpt.save(4, make_state(4, step=4))  # the Checkpointer stays usable
    assert ckpt.all_steps() == [1, 2, 4]
    ckpt.close()


def test_keep_best_by_a_metric(tmp_path):
    losses = {1: 0.5, 2: 0.2, 3: 0.9, 4: 0.1, 5: 0.7}
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="loss") as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, {"x": jnp.float32(loss)}, metrics={"loss": loss})
        assert ckpt.all_steps() == [2, 4, 5]  # the 2 lowest losses, plus the newest
    with Checkpointer(tmp_path, max_to_keep=2, best_metric="loss") as reopened:
        reopened.save(6, {"x": jnp.float32(0.15)}, metrics={"loss": 0.15})
        assert reopened.all_steps() == [4, 6]  # the metrics were read back from disk
    with Checkpointer(tmp_path / "max", max_to_keep=1, best_metric="acc",
                      best_mode="max") as ckpt:
        for step, acc in ((1, 0.9), (2, 0.3), (3, 0.5)):
            ckpt.save(step, {"x": jnp.float32(acc)}, metrics={"acc": acc})
        assert ckpt.all_steps() == [1, 3]


def test_checkpoints_of_the_previous_format_are_read(tmp_path, caplog):
    """Format 1 (hand-written): tree.json and metadata.json beside orbax's state/."""
    import orbax.checkpoint as ocp

    from sparsejax.io import checkpoint_leaves

    def write_format_1(step, state, meta):
        folder = tmp_path / f"step_{step:08d}"
        items, entries = checkpoint_leaves.save_items(state)
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as writer:
            writer.save(folder / "state", args=ocp.args.StandardSave(items))
        (folder / "tree.json").write_text(json.dumps({"leaves": entries}))
        (folder / "metadata.json").write_text(json.dumps(meta))
        files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                    "sha256": checkpoint_manifest.hash_file(p)}
                 for p in folder.rglob("*") if p.is_file()}
        body = {"format": "sparsejax.checkpoint", "version": 1, "step": step, "files": files}
        (folder / "MANIFEST.json").write_bytes(checkpoint_manifest.manifest_bytes(body))
        return folder

    write_format_1(1, make_state(1, step=1), {"batch": 1})
    _truncate(write_format_1(2, make_state(2, step=2), {"batch": 2}))
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.read_metadata(2) == {"batch": 2}
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, restored, meta = ckpt.restore(make_state())
        assert (step, meta) == (1, {"batch": 1}) and "truncated" in warnings_text(caplog)
        assert_bitwise_equal(restored, make_state(1, step=1))
        ckpt.save(3, make_state(3, step=3), {"batch": 3})  # new saves use the new format
        assert ckpt.all_steps() == [1, 3] and ckpt.read_metadata(3) == {"batch": 3}


# --------------------------------------------------------------------------- retention


def test_max_to_keep(tmp_path):
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    for step in range(1, 6):
        ckpt.save(step, make_state(step, step=step), {"batch": step})
    assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    step, restored, meta = ckpt.restore(make_state())
    assert (step, meta) == (5, {"batch": 5})
    assert_bitwise_equal(restored, make_state(5, step=5))
    assert ckpt.restore(make_state(), step=4)[0] == 4

    keep_all = Checkpointer(tmp_path / "all", max_to_keep=None)
    for step in range(4):
        keep_all.save(step, {"x": jnp.int32(step)})
    assert keep_all.all_steps() == [0, 1, 2, 3]

    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)


def test_resave_same_step_replaces_it(two_steps, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        two_steps.save(1, make_state(8, step=1))
    assert "newer checkpoints [2] exist" in warnings_text(caplog)
    assert "replacing existing checkpoint" in warnings_text(caplog)
    two_steps.save(2, make_state(9, step=2), {"batch": "again"})
    step, restored, meta = two_steps.restore(make_state())
    assert (step, meta) == (2, {"batch": "again"})
    assert_bitwise_equal(restored, make_state(9, step=2))
    assert two_steps.all_steps() == [1, 2]


# --------------------------------------------------------------------------- corruption


def _truncate(step_dir: Path) -> str:
    f = largest_data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "truncated"


def _delete_manifest(step_dir: Path) -> str:
    """The manifest is committed with the checkpoint: a checkpoint without one is bad."""
    (step_dir / "MANIFEST.json").unlink()
    return "no MANIFEST.json: not a completed save"


def _flip_bytes(step_dir: Path) -> str:
    f = largest_data_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return "checksum mismatch"


def _delete_file(step_dir: Path) -> str:
    (step_dir / "metadata" / "metadata").unlink()
    return "metadata/metadata is missing"


def _edit_manifest(step_dir: Path) -> str:
    manifest = step_dir / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"step": 2', '"step": 3'))
    return "MANIFEST.json checksum mismatch"


def _unreadable_but_checksummed(step_dir: Path) -> str:
    """Damage a data file and re-checksum it: only orbax's own read can notice."""
    f = largest_data_file(step_dir)
    f.write_bytes(b"\0" * f.stat().st_size)
    manifest = step_dir / "MANIFEST.json"
    body = json.loads(manifest.read_text())["body"]
    rel = f.relative_to(step_dir).as_posix()
    body["files"][rel]["sha256"] = checkpoint_manifest.hash_file(f)
    manifest.write_bytes(checkpoint_manifest.manifest_bytes(body))
    return "could not be read"


@pytest.mark.parametrize(
    "damage",
    [_truncate, _delete_manifest, _flip_bytes, _delete_file, _edit_manifest],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_newest_checkpoint_falls_back(two_steps, damage, caplog):
    bad_dir = two_steps.directory / "step_00000002"
    reason = damage(bad_dir)
    assert two_steps.latest_step() == 1
    assert two_steps.all_steps() == [1]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        step, restored, meta = two_steps.restore(make_state())
    assert (step, meta) == (1, {"epoch": 0, "batch": 1})
    assert_bitwise_equal(restored, make_state(1, step=1))
    text = warnings_text(caplog)
    assert "step_00000002" in text and reason in text, text
    assert bad_dir.exists()  # nothing is deleted because it was bad
    with pytest.raises(CorruptCheckpointError, match=reason):
        two_steps.restore(make_state(), step=2)


def test_checkpoint_orbax_cannot_read_falls_back(two_steps, caplog):
    reason = _unreadable_but_checksummed(two_steps.directory / "step_00000002")
    assert two_steps.latest_step() == 2  # the checksums agree; only reading shows it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        step, restored, _ = two_steps.restore(make_state())
    assert step == 1
    assert_bitwise_equal(restored, make_state(1, step=1))
    assert "step_00000002" in warnings_text(caplog) and reason in warnings_text(caplog)


def test_after_fallback_training_resumes_and_saves_over_the_bad_step(two_steps):
    _flip_bytes(two_steps.directory / "step_00000002")
    step, state, _ = two_steps.restore(make_state())
    state = train_step(state)
    two_steps.save(step + 1, state, {"batch": 2})
    assert two_steps.all_steps() == [1, 2]
    assert_bitwise_equal(two_steps.restore(make_state())[1], state)


def test_all_bad_or_empty_raises_clear_error(two_steps, tmp_path):
    for name in ("step_00000001", "step_00000002"):
        _truncate(two_steps.directory / name)
    assert two_steps.latest_step() is None and two_steps.all_steps() == []
    with pytest.raises(NoValidCheckpointError, match=str(two_steps.directory)) as err:
        two_steps.restore(make_state())
    assert isinstance(err.value, FileNotFoundError)
    assert "step_00000001" in str(err.value) and "truncated" in str(err.value)

    for empty in (tmp_path / "empty", tmp_path / "does_not_exist"):
        if empty.name == "empty":
            empty.mkdir()
        ckpt = Checkpointer(empty)
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match="no valid checkpoint in .*" + empty.name):
            ckpt.restore(make_state())
    with pytest.raises(NoValidCheckpointError, match="step 7"):
        two_steps.restore(make_state(), step=7)


def test_leftover_temporary_directory_is_ignored_then_removed(two_steps, caplog):
    """A killed process leaves orbax's temporary folder; the next process removes it."""
    leftover = two_steps.directory / "step_00000003.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "junk").write_bytes(b"partial")
    assert two_steps.all_steps() == [1, 2]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert two_steps.restore(make_state())[0] == 2
    assert "incomplete" in warnings_text(caplog) and leftover.name in warnings_text(caplog)
    with Checkpointer(two_steps.directory) as restarted:
        restarted.save(3, make_state(3))
        assert restarted.all_steps() == [1, 2, 3]
    assert not leftover.exists()


def test_bad_metadata_writes_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(1, make_state(), {"bad": object()})
    with pytest.raises(TypeError, match="unsupported leaf type str"):
        ckpt.save(1, {"name": "not an array"})
    with pytest.raises(TypeError, match="abstract leaf"):
        ckpt.save(1, jax.eval_shape(make_state))
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path, best_mode="lowest")
    with pytest.raises(ValueError, match=r"metrics\['val_loss'\]"):
        Checkpointer(tmp_path, best_metric="val_loss").save(1, make_state())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- template


def test_template_mismatch_is_a_clear_error(two_steps):
    wrong_shape = make_state()
    wrong_shape = wrong_shape.replace(
        params={"dense": {"kernel": jnp.zeros((8, 5)), "bias": jnp.zeros(4)}}
    )
    with pytest.raises(TemplateMismatchError, match=r"shape of .*kernel.*\(8, 4\).*\(8, 5\)"):
        two_steps.restore(wrong_shape)

    wrong_dtype = make_state()
    wrong_dtype = wrong_dtype.replace(masks=jax.tree.map(jnp.float32, wrong_dtype.masks))
    with pytest.raises(TemplateMismatchError, match=r"dtype of .*masks.*bool.*float32"):
        two_steps.restore(wrong_dtype)

    missing = {"params": make_state().params}
    with pytest.raises(TemplateMismatchError, match="in checkpoint but not in template") as err:
        two_steps.restore(missing, step=1)
    assert "step_00000001" in str(err.value)
    assert isinstance(err.value, ValueError)


# --------------------------------------------------------------------------- SIGKILL

CHILD = r"""
import json, os, pathlib, shutil, signal, sys, threading, time
import jax, jax.numpy as jnp
import sparsejax.io.checkpoint as ck
import sparsejax.io.checkpoint_manifest as manifest

# One child per scenario, forked from this process once the modules are imported (no JAX
# backend exists yet, so no thread is forked): the imports are paid once, not per child.
outputs, scenarios = sys.argv[1], sys.argv[2:]
children = {}
for directory, point in zip(scenarios[::2], scenarios[1::2]):
    pid = os.fork()
    if pid == 0:
        log = os.open(os.path.join(outputs, point), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        break
    children[point] = pid
else:
    codes = {}
    for point, pid in children.items():
        status = os.waitpid(pid, 0)[1]
        codes[point] = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                        else os.WEXITSTATUS(status))
    print(json.dumps(codes), flush=True)
    sys.exit(0)

def small(step):
    return {"w": jnp.arange(1000, dtype=jnp.float32) * step,
            "m": jnp.arange(1000) % 3 == 0, "step": jnp.int32(step),
            "key": jax.random.PRNGKey(step)}

def big(step):
    return dict(small(step), big=jax.random.normal(jax.random.PRNGKey(step), (1 << 21,)))

def die():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)

ckpt = ck.Checkpointer(directory, max_to_keep=1 if point == "during_delete" else 3,
                       async_save=True)  # as the training loop saves
ckpt.save(1, small(1), {"epoch": 0, "batch": 1})
ckpt.wait_until_finished()

if point == "during_async_write":  # the background write never commits; training goes on
    ck._write_manifest = lambda folder, step: time.sleep(60)
elif point == "while_hashing":  # killed while the manifest is being computed
    real, calls = manifest.hash_file, []
    def hash_then_die(path):
        calls.append(path)
        if len(calls) == 3:
            die()
        return real(path)
    manifest.hash_file = hash_then_die
elif point == "before_commit":  # manifest written, orbax's rename not yet done
    real_manifest = ck._write_manifest
    def manifest_then_die(folder, step):
        real_manifest(folder, step)
        die()
    ck._write_manifest = manifest_then_die
elif point == "during_delete":  # step 2 committed, orbax deleting step 1
    def rmtree_then_die(path, *a, **k):
        files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())
        files[0].unlink()
        die()
    shutil.rmtree = rmtree_then_die

ckpt.save(2, big(2), {"epoch": 0, "batch": 2})
print("save returned", flush=True)
if point == "during_async_write":
    tmp = pathlib.Path(directory) / "step_00000002.orbax-checkpoint-tmp"
    while not any(p.is_file() for p in tmp.rglob("*")):
        time.sleep(0.001)  # orbax is writing the arrays while this "trains"
    die()
ckpt.wait_until_finished()
print("save finished without being killed", flush=True)
os._exit(0)
"""


def _child_small(step: int) -> dict:
    return {
        "w": jnp.arange(1000, dtype=jnp.float32) * step,
        "m": jnp.arange(1000) % 3 == 0,
        "step": jnp.int32(step),
        "key": jax.random.PRNGKey(step),
    }


KILL_POINTS = ["during_async_write", "while_hashing", "before_commit", "during_delete"]


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Run every SIGKILL scenario at once, each in a child process with its own directory
    (forked from one process that imported jax and the checkpointer once)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    # One device in the child, but the same XLA flags otherwise: the child's arrays are
    # compared bit for bit with the same arrays computed here.
    env["XLA_FLAGS"] = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                if "device_count" not in flag)
    outputs = tmp_path_factory.mktemp("outputs")
    directories = {point: tmp_path_factory.mktemp(point) for point in KILL_POINTS}
    args = [str(a) for point in KILL_POINTS for a in (directories[point], point)]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(outputs), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout
    codes = json.loads(proc.stdout.splitlines()[-1])
    return {point: (directories[point], codes[point], (outputs / point).read_text())
            for point in KILL_POINTS}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_during_save_keeps_previous_checkpoint(killed_saves, point, caplog):
    tmp_path, returncode, output = killed_saves[point]
    assert returncode == -signal.SIGKILL, output
    if point == "during_async_write":
        assert "save returned" in output  # killed while the write went on in the background

    ckpt = Checkpointer(tmp_path, max_to_keep=3)
    if point == "during_delete":  # killed after step 2 was committed, while deleting step 1
        assert list(ckpt.step_dirs()) == [1, 2] and ckpt.all_steps() == [2]
        big = dict(_child_small(2), big=jax.random.normal(jax.random.PRNGKey(2), (1 << 21,)))
        step, state, meta = ckpt.restore(big)
        assert (step, meta) == (2, {"epoch": 0, "batch": 2})
        assert_bitwise_equal(state, big)
    else:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        leftovers = [p.name for p in tmp_path.iterdir() if "orbax-checkpoint-tmp" in p.name]
        assert leftovers, "the killed save should leave only orbax's temporary folder"
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            step, state, meta = ckpt.restore(_child_small(1))
        assert (step, meta) == (1, {"epoch": 0, "batch": 1})
        assert_bitwise_equal(state, _child_small(1))
        assert "incomplete" in warnings_text(caplog)
    # The next save (a restarted run) cleans up whatever the killed process left behind.
    ckpt.save(5, _child_small(5))
    ckpt.close()
    assert all(p.name.startswith("step_") for p in tmp_path.iterdir())
    assert ckpt.latest_step() == 5


# --------------------------------------------------------------------------- processes

TWO_PROCESSES = r"""
import sys
import jax
process, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", 2, process)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sparsejax.io.checkpoint import Checkpointer
mesh = jax.make_mesh((jax.device_count(),), ("d",))
full = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
w = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("d")), lambda i: full[i])
state = {"w": w, "step": jax.device_put(np.int32(7), NamedSharding(mesh, P()))}
with Checkpointer(directory, max_to_keep=2, async_save=True) as ckpt:
    for step in (1, 2, 3):
        ckpt.save(step, state, {"position": step})
    template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    step, restored, meta = ckpt.restore(template)
    shards_ok = all(np.array_equal(np.asarray(s.data), full[s.index])
                    for s in restored["w"].addressable_shards)
    print("result", jax.device_count(), step, meta, shards_ok, ckpt.all_steps(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_save_together_and_one_restores(tmp_path):
    """2 processes x 2 devices write one sharded checkpoint (process 0 alone writes the
    manifest); a single one-device process restores it."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(i), str(port),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output
        assert "result 4 3 {'position': 3} True [2, 3]" in output, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    full = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    template = {"step": np.int32(0), "w": jax.ShapeDtypeStruct((32, 3), jnp.float32)}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.problems() == {2: None, 3: None}
        step, restored, meta = ckpt.restore(template)
    assert (step, meta, int(restored["step"])) == (3, {"position": 3}, 7)
    np.testing.assert_array_equal(np.asarray(restored["w"]), full)
