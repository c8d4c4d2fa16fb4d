"""Test set-up (tests and doctests), read before jax is imported anywhere.

* Simulated CPU devices for the multi-device tests.
* XLA's CPU backend at optimisation level 0, without its newer fusion emitters, and one
  LLVM module per program: the tests run small shapes for a few steps, so compiling is
  most of their time; level 0 compiles a top-k program in 1.3 s instead of 2.1 s, and the
  older fusion code path then in 0.4 s instead of 1.1 s (measured on a loaded and an idle
  machine); not splitting a program for parallel codegen threads takes about 20% off the
  compile time of the rest (test_dst, test_gates). What the tests check (masks, counts,
  bitwise resume, parity with hand-worked values) depends on none of them; benchmarks and
  real runs keep XLA's defaults.
* One folder for generated datasets (``SPARSEJAX_CACHE_DIR``), fresh for the run.
* One persistent compilation cache for the whole run, in a fresh temporary folder: many
  tests build the same train step again (a run, then its resume; a CLI subprocess after
  another), and XLA compiles each program once instead of each time. pytest-xdist's
  workers and the CLI subprocesses inherit the folder through the environment, and the
  process that made it removes it at the end, so no run ever starts from an old cache.
"""

import atexit
import gc
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Simulated CPU devices share 2 cores: under load a collective's participants can arrive
# more than XLA's default 40 s apart, which aborts the process (docs/parallel.md).
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
    _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
if "xla_cpu_use_fusion_emitters" not in _flags:
    _flags += " --xla_cpu_use_fusion_emitters=false"
# One LLVM module per program instead of several compiled on parallel threads: the tests'
# programs are small and two xdist workers already share the 2 cores, so the split only
# adds work (about 20% less compile CPU time, measured on test_dst and test_gates). It
# changes how the code is compiled, not what it computes.
if "xla_cpu_parallel_codegen_split_count" not in _flags:
    _flags += " --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sparsejax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _cache, True)

# Generated datasets (MNIST-1D) are kept in a fresh folder of this run, not the user's
# ~/.cache/sparsejax: a worker or CLI child reads what another generated, and no run starts
# from an old file.
if "SPARSEJAX_CACHE_DIR" not in os.environ:
    _data_cache = tempfile.mkdtemp(prefix="sparsejax-tests-data-cache-")
    os.environ["SPARSEJAX_CACHE_DIR"] = _data_cache
    atexit.register(shutil.rmtree, _data_cache, True)

# Python's cyclic garbage collector ran about 21,000 times in a default run and took 33 s of
# the two workers' CPU time (a `gc.callbacks` timer, session 19): tracing and lowering
# allocate many small objects, and the workers' heaps hold every program they compiled.
# A larger first generation runs it about a hundredth as often (0.2 s against 2.5 s on
# test_gates.py with test_models.py); no test depends on when garbage is collected.
gc.set_threshold(50_000, 50, 1_000)


# The longest test files first, so that with one file per xdist worker at a time (see
# pyproject.toml) neither worker is left running a long file alone at the end. Measured
# with --durations; a file missing from the list runs after these, in collection order.
_LONGEST_FIRST = ["test_multiprocess.py", "test_docs.py", "test_dst.py", "test_training_loop.py",
                  "test_optax_form.py", "test_pruning.py", "test_stranded_runs.py",
                  "test_gates.py", "test_parallel.py", "test_strong.py", "test_interrupts.py",
                  "test_export.py", "test_sharded_methods.py", "test_resume_all_methods.py",
                  "test_models.py", "test_run_safety.py", "test_optax_compose.py",
                  "test_posttrain_capture.py", "test_prune_cli.py", "test_compile_cache.py",
                  "test_topk.py", "test_properties.py", "test_lottery.py",
                  "test_device_suite.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))
