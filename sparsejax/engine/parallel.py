"""Data-parallel train steps on JAX's own runtime: ``jax.pmap`` or sharded ``jax.jit``.

Both styles run the same :func:`~sparsejax.harness.training.make_train_step`, so every method
works in both:

* ``pmap``: the state is replicated along a leading device axis and each device gets its
  slice of the global batch; gradients, batch statistics and metrics are averaged with
  ``lax.pmean`` over the named axis *before* the method's ``update`` sees them, so every
  mask decision is made on the same numbers on every device.
* ``sharded``: ``jax.jit`` over a device mesh; the batch is split along the ``data`` mesh
  axis with ``NamedSharding``, the state is replicated (or, optionally, large kernels and
  everything of their shape are split along a ``model`` axis). XLA inserts the
  all-reduce; the program is the single-device program on the global batch.

Methods whose masks move on a schedule (dynamic sparse training, scheduled pruning) get
two compiled steps, one without the mask update and one with it (their
:class:`~sparsejax.methods.MaskPhases`); the trainer picks one per step from its host
copy of the step counter, so the steps in between run without an untaken branch.

Random decisions (SET's regrowth, gate noise) are keyed by ``fold_in(rng, step)`` from
the replicated state, so all devices draw the same numbers and masks never diverge.

Several processes (hosts, or local processes started by ``sparsejax launch``): call
:func:`initialize_distributed` first in every process; each loads its own rows of the
global batch (``sparsejax.harness.data.shard_for_process``); :func:`ShardedTrainer.put_batch`
assembles the global array from the per-process parts, and :class:`PmapTrainer` maps
over every process's devices. The step is the same program as on one process, so the
masks are the same in every process (``tests/test_multiprocess.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsejax.engine.step import LossFn, make_train_step
from sparsejax.methods.base import Method, SparseState

__all__ = [
    "PARALLEL_MODES",
    "ParallelMode",
    "initialize_distributed",
    "join_processes",
    "replicate",
    "unreplicate",
    "split_batch",
    "PmapTrainer",
    "ShardedTrainer",
    "make_mesh",
    "state_sharding",
    "make_trainer",
    "SingleDeviceTrainer",
]

PARALLEL_MODES = ("none", "pmap", "sharded")
ParallelMode = Literal["none", "pmap", "sharded"]
AXIS_NAME = "batch"

Metrics = dict[str, jax.Array]


def _host_step(step: Any) -> int:
    """``state.step`` as a Python int (the first copy where it is replicated)."""
    if isinstance(step, jax.Array) and not step.is_fully_addressable:
        step = step.addressable_data(0)
    return int(np.asarray(step).reshape(-1)[0])


class _PhasedStep:
    """A method's train step as every trainer runs it: ``compile_step(method)``, or, for
    a method with :class:`~sparsejax.methods.MaskPhases`, one compiled step per phase
    (``update`` replaced by ``phases.train`` / ``phases.move``), picked per call.

    The pick uses a host copy of ``state.step``, read from the device only when handed a
    state this object did not just return (the first step, a resumed or replaced
    state), so the steps of a run are dispatched without waiting for the device.
    """

    def __init__(self, method: Method,
                 compile_step: Callable[[Method], Callable[..., tuple[Any, Any]]]) -> None:
        self._due = None if method.phases is None else method.phases.due
        if method.phases is None:
            self._steps = {None: compile_step(method)}
        else:
            self._steps = {
                due: compile_step(method._replace(update=update, phases=None))
                for due, update in ((False, method.phases.train), (True, method.phases.move))}
        self._count = 0
        self._last: Any = None

    def __call__(self, state: SparseState, batch: Any) -> tuple[SparseState, Any]:
        if self._due is None:
            return self._steps[None](state, batch)
        if state is not self._last:
            self._count = _host_step(state.step)
        state, metrics = self._steps[self._due(self._count + 1)](state, batch)
        self._count += 1
        self._last = state
        return state, metrics


def initialize_distributed(**kwargs: Any) -> bool:
    """Start JAX's multi-process runtime when this process is one of several.

    On TPU pods and SLURM/Open MPI clusters ``jax.distributed.initialize()`` finds its
    peers by itself; elsewhere pass ``coordinator_address``, ``num_processes`` and
    ``process_id`` (or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``, as ``sparsejax launch`` does). Returns ``False`` (and does
    nothing) for a single process, ``True`` once the runtime is up (also when it already
    was). Call it before anything else touches JAX's devices. On CPU the processes'
    collectives go through gloo, JAX's default ``jax_cpu_collectives_implementation``.
    """
    if jax.distributed.is_initialized():
        return True
    env = {
        "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
        "process_id": os.environ.get("JAX_PROCESS_ID"),
    }
    for key, value in env.items():
        if value is not None and key not in kwargs:
            kwargs[key] = int(value) if key != "coordinator_address" else value
    if not kwargs and not os.environ.get("SLURM_JOB_ID") and "TPU_WORKER_ID" not in os.environ:
        return False
    jax.distributed.initialize(**kwargs)
    return True


def join_processes(mode: str) -> None:
    """Join the other processes of a run (``sparsejax launch``, a cluster's coordinator
    variables) before anything touches a device: ``train`` calls it first. Several
    processes train one model only in a parallel ``mode`` (pmap or sharded)."""
    if mode != "none":
        initialize_distributed()
    elif int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        raise ValueError(
            f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']}: several processes train "
            "one model only with --parallel sharded or --parallel pmap")


def replicate(tree: Any, num_devices: int | None = None) -> Any:
    """Copies of ``tree`` stacked along a new leading axis, one per local device (pmap
    places slice ``i`` on device ``i``)."""
    n = num_devices or jax.local_device_count()
    return jax.tree_util.tree_map(lambda x: jnp.stack([jnp.asarray(x)] * n), tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of a pmapped tree (all replicas are identical)."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_batch(batch: Any, num_devices: int) -> Any:
    """Reshape the leading (global batch) axis into ``(num_devices, per_device, ...)``."""

    def split(x: Any) -> Any:
        x = np.asarray(x)
        if x.shape[0] % num_devices:
            raise ValueError(
                f"global batch of {x.shape[0]} does not split evenly over {num_devices} "
                "devices; choose a batch size divisible by the device count"
            )
        return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


class PmapTrainer:
    """``jax.pmap`` data parallelism over every device of every process.

    With several processes (:func:`initialize_distributed`) the pmap spans all their
    devices, so ``lax.pmean`` averages over the global batch; each process passes its
    own rows (``shard_for_process``) and holds the replicas of its local devices.

    >>> import jax, jax.numpy as jnp, optax, sparsejax
    >>> method = sparsejax.dense(optax.sgd(0.1))
    >>> loss = sparsejax.stateless_loss(lambda p, b: jnp.mean((b @ p["w"]) ** 2))
    >>> trainer = PmapTrainer(method, loss)
    >>> state = trainer.put_state(method.init({"w": jnp.ones((3, 2))}, jax.random.PRNGKey(0)))
    >>> n = jax.local_device_count()
    >>> state, metrics = trainer.step(state, trainer.put_batch(jnp.ones((2 * n, 3))))
    >>> int(trainer.get_state(state).step)
    1
    """

    def __init__(self, method: Method, loss_fn: LossFn,
                 devices: list[jax.Device] | None = None, *,
                 skip_nonfinite: bool = False) -> None:
        # all processes' devices: a pmap over this process's devices alone would average
        # each process's gradients apart, and the replicas would drift apart
        self.devices = devices or jax.devices()
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self._step = _PhasedStep(method, lambda m: jax.pmap(
            make_train_step(m, loss_fn, axis_name=AXIS_NAME, skip_nonfinite=skip_nonfinite),
            axis_name=AXIS_NAME, devices=self.devices))

    def put_state(self, state: SparseState) -> SparseState:
        return replicate(state, len(self.local_devices))

    def put_batch(self, batch: Any) -> Any:
        """This process's rows (all of the global batch for one process), one slice per
        local device."""
        return split_batch(batch, len(self.local_devices))

    def get_state(self, state: SparseState) -> SparseState:
        return unreplicate(state)

    def step(self, state: SparseState, batch: Any) -> tuple[SparseState, Metrics]:
        state, metrics = self._step(state, batch)
        return state, unreplicate(metrics)


def _to_host_if_local(x: Any) -> Any:
    """``x`` as numpy where it is a process-local ``jax.Array`` (PRNG keys as key data
    wrapped again), else ``x``."""
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)),
                                        impl=jax.random.key_impl(x))
    return np.asarray(x)


def make_mesh(num_model: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` device mesh over all (global) devices; ``num_model`` devices
    per model-parallel group (1: pure data parallelism). ``jax.make_mesh`` lays the
    devices out for the hardware's topology; the axes are ``Auto`` (the compiler
    propagates the shardings that ``ShardedTrainer`` gives its inputs and outputs)."""
    devices = devices or jax.devices()
    if not isinstance(num_model, int) or num_model < 1 or len(devices) % num_model:
        raise ValueError(f"{len(devices)} devices do not split into groups of {num_model}")
    return jax.make_mesh((len(devices) // num_model, num_model), ("data", "model"),
                         (jax.sharding.AxisType.Auto,) * 2, devices=devices)


def state_sharding(state: Any, mesh: Mesh, *, shard_model_axis: bool = False,
                   min_size: int = 2**18) -> Any:
    """A ``NamedSharding`` per leaf: replicated, or (with ``shard_model_axis``) split along
    the ``model`` axis on the last dimension for leaves with ``ndim >= 2``, at least
    ``min_size`` entries and a last dimension divisible by the model axis. The rule
    depends on the leaf's shape only, so a kernel, its mask, its scores and its optimizer
    slots are always split the same way."""
    model = mesh.shape["model"]

    def spec(x: Any) -> NamedSharding:
        shape = np.shape(x)
        split = (shard_model_axis and model > 1 and len(shape) >= 2
                 and int(np.prod(shape)) >= min_size and shape[-1] % model == 0)
        if split:
            return NamedSharding(mesh, PartitionSpec(*([None] * (len(shape) - 1)), "model"))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(spec, state)


class ShardedTrainer:
    """``jax.jit`` over a device mesh: the batch split along ``data``, the state
    replicated (optionally large kernels split along ``model``).

    >>> import jax, jax.numpy as jnp, optax, sparsejax
    >>> method = sparsejax.dense(optax.sgd(0.1))
    >>> loss = sparsejax.stateless_loss(lambda p, b: jnp.mean((b @ p["w"]) ** 2))
    >>> trainer = ShardedTrainer(method, loss)
    >>> state = trainer.put_state(method.init({"w": jnp.ones((3, 2))}, jax.random.PRNGKey(0)))
    >>> n = jax.device_count()
    >>> state, metrics = trainer.step(state, trainer.put_batch(jnp.ones((2 * n, 3))))
    >>> int(trainer.get_state(state).step)
    1
    """

    def __init__(self, method: Method, loss_fn: LossFn, mesh: Mesh | None = None, *,
                 shard_model_axis: bool = False, min_shard_size: int = 2**18,
                 skip_nonfinite: bool = False) -> None:
        self.mesh = mesh or make_mesh()
        self.shard_model_axis = shard_model_axis
        self.min_shard_size = min_shard_size
        self._step = _PhasedStep(method, lambda m: self._sharded(
            make_train_step(m, loss_fn, skip_nonfinite=skip_nonfinite)))

    def state_sharding(self, state: SparseState) -> Any:
        return state_sharding(state, self.mesh, shard_model_axis=self.shard_model_axis,
                              min_size=self.min_shard_size)

    def put_state(self, state: SparseState) -> SparseState:
        """Place ``state`` (the same in every process) on the mesh. With several
        processes, arrays that live on this process's devices alone (a state made or
        restored here) go through the host: JAX moves no array between processes."""
        if jax.process_count() > 1:
            state = jax.tree_util.tree_map(_to_host_if_local, state)
        return jax.device_put(state, self.state_sharding(state))

    def batch_sharding(self, batch: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda x: NamedSharding(self.mesh, PartitionSpec("data")), batch)

    def put_batch(self, batch: Any) -> Any:
        """Place a batch: on one host the global batch; on several, this host's part
        (its rows of the global batch, from ``shard_for_process``)."""
        sharding = self.batch_sharding(batch)
        if jax.process_count() == 1:
            n = self.mesh.shape["data"]
            for x in jax.tree_util.tree_leaves(batch):
                if np.shape(x)[0] % n:
                    raise ValueError(
                        f"global batch of {np.shape(x)[0]} does not split evenly over {n} "
                        "data-parallel devices"
                    )
            return jax.device_put(batch, sharding)
        return jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
            batch, sharding)

    def get_state(self, state: SparseState) -> SparseState:
        return state

    def _sharded(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
        """``train_step`` under ``jax.jit`` with this mesh's shardings, compiled once per
        structure of (state, batch)."""
        compiled: dict[Any, Callable[..., Any]] = {}

        def run(state: SparseState, batch: Any) -> tuple[SparseState, Metrics]:
            key = jax.tree_util.tree_structure((state, batch))
            if key not in compiled:
                state_sh = self.state_sharding(state)
                replicated = NamedSharding(self.mesh, PartitionSpec())
                compiled[key] = jax.jit(
                    train_step,
                    in_shardings=(state_sh, self.batch_sharding(batch)),
                    out_shardings=(state_sh, replicated),
                )
            return compiled[key](state, batch)

        return run

    def step(self, state: SparseState, batch: Any) -> tuple[SparseState, Metrics]:
        return self._step(state, batch)


class SingleDeviceTrainer:
    """The plain ``jax.jit`` step behind the same interface (``--parallel none``)."""

    def __init__(self, method: Method, loss_fn: LossFn, *, skip_nonfinite: bool = False) -> None:
        # The state is donated: the step writes the new state into the old one's buffers,
        # which halves the state's memory and, on CPU too, saves a copy of every buffer the
        # step passes through (a LeNet-300-100 step: about 10% faster). The loop never
        # touches a state after stepping it; an async checkpoint copies the arrays to host
        # memory before save() returns, so a donated state is never read by the writer.
        self._step = _PhasedStep(method, lambda m: jax.jit(
            make_train_step(m, loss_fn, skip_nonfinite=skip_nonfinite), donate_argnums=(0,)))

    def put_state(self, state: SparseState) -> SparseState:
        return state

    def put_batch(self, batch: Any) -> Any:
        return batch

    def get_state(self, state: SparseState) -> SparseState:
        return state

    def step(self, state: SparseState, batch: Any) -> tuple[SparseState, Metrics]:
        return self._step(state, batch)


def make_trainer(mode: str, method: Method, loss_fn: LossFn, **options: Any):
    """The trainer for ``--parallel none | pmap | sharded``; ``options`` go to its class
    (e.g. ``skip_nonfinite``, a ``mesh``)."""
    if mode == "none":
        return SingleDeviceTrainer(method, loss_fn, **options)
    if mode == "pmap":
        return PmapTrainer(method, loss_fn, **options)
    if mode == "sharded":
        return ShardedTrainer(method, loss_fn, **options)
    raise ValueError(f"unknown parallel mode {mode!r}; known: {', '.join(PARALLEL_MODES)}")
