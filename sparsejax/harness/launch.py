"""``sparsejax launch``: several JAX processes on this machine as one job, in one command.

``sparsejax launch -n 2 --devices-per-process 4 -- train --parallel sharded ...`` starts
two processes that find each other through ``jax.distributed`` (a coordinator on a free
local port, handed over in ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, which :func:`~sparsejax.engine.parallel.initialize_distributed`
reads), prefixes every line they print with ``[i]``, and fails fast: when one process
exits with an error the others are stopped and the launcher exits with that code.

The command after ``--`` is a sparsejax command (``train ...``) or any other program
(``python my_script.py ...``), which then calls ``initialize_distributed()`` itself.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from sparsejax.core.validation import is_int

__all__ = ["free_port", "check_port", "oversubscription_warning", "process_env", "launch",
           "add_commands"]

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
COLLECTIVE_TIMEOUT_S = 600
"""How long a simulated CPU device's collective may wait for the others (XLA's default:
40 s) in the processes ``launch`` starts with ``--devices-per-process``."""


def free_port() -> int:
    """A TCP port that no one listens on now (the coordinator's, picked by the OS).

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


OVERSUBSCRIBED = 8
"""``launch`` warns when its processes hold more than this many simulated devices per
CPU core (``-n`` x ``--devices-per-process`` > 8 x ``os.cpu_count()``)."""


def check_port(port: int) -> None:
    """Raise ``ValueError`` naming ``--port`` unless ``port`` is a TCP port that can be
    listened on now: process 0's coordinator (gRPC) binds it, and on a port in use it
    failed with "Failed to add port to server" and a segfault (exit code 139). The port
    is bound briefly (``SO_REUSEADDR``, as gRPC does) and released at once.

    >>> check_port(0)
    Traceback (most recent call last):
    ...
    ValueError: --port must be a TCP port in [1, 65535], got 0
    """
    if not is_int(port) or not 1 <= port <= 65535:
        raise ValueError(f"--port must be a TCP port in [1, 65535], got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as error:
            reason = error.strerror or str(error)
            raise ValueError(
                f"--port {port} cannot be listened on ({reason}): process 0's coordinator "
                "needs it; choose another --port, or leave --port out for a free "
                "one") from None


def oversubscription_warning(num_processes: int, devices_per_process: int | None,
                             cores: int | None) -> str | None:
    """The warning line for ``num_processes`` x ``devices_per_process`` simulated devices
    on ``cores`` CPU cores, when they are more than :data:`OVERSUBSCRIBED` per core;
    ``None`` when they are not (or either number is unknown).

    >>> oversubscription_warning(2, 4, 2) is None
    True
    >>> "16 = 64 simulated devices on 2 CPU cores (32 per core" in oversubscription_warning(
    ...     4, 16, 2)
    True
    """
    if devices_per_process is None or not cores:
        return None
    devices = num_processes * devices_per_process
    if devices <= OVERSUBSCRIBED * cores:
        return None
    return (f"sparsejax launch: warning: -n {num_processes} x --devices-per-process "
            f"{devices_per_process} = {devices} simulated devices on {cores} CPU cores "
            f"({devices / cores:g} per core, more than {OVERSUBSCRIBED}): every step waits on "
            "collectives of starved devices and may run very slowly; fewer processes or "
            "devices per process run faster")


def process_env(process_id: int, num_processes: int, port: int,
                devices_per_process: int | None = None,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` (default: this process's) plus
    the coordinator variables and, with ``devices_per_process``, that many simulated CPU
    devices (the XLA flag replaced, other XLA flags kept) on the CPU platform alone
    (``JAX_PLATFORMS=cpu``: on a GPU host every process would otherwise claim every GPU).

    >>> env = process_env(1, 2, 1234, devices_per_process=4, base={"XLA_FLAGS": "--a=1"})
    >>> env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]
    ('localhost:1234', '2', '1')
    >>> env["JAX_PLATFORMS"], env["XLA_FLAGS"].split()[:2]
    ('cpu', ['--a=1', '--xla_force_host_platform_device_count=4'])
    >>> env["XLA_FLAGS"].split()[2]  # simulated devices wait for each other up to 600 s
    '--xla_cpu_collective_call_terminate_timeout_seconds=600'
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} is not in [0, {num_processes})")
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
    if devices_per_process is not None:
        flags = re.sub(rf"{_DEVICE_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
        flags.append(f"{_DEVICE_FLAG}={devices_per_process}")
        # Simulated devices share the host's cores: a collective whose participants are
        # starved more than XLA's default 40 s apart would abort the process.
        if not any(f.startswith(f"{_COLLECTIVE_TIMEOUT_FLAG}=") for f in flags):
            flags.append(f"{_COLLECTIVE_TIMEOUT_FLAG}={COLLECTIVE_TIMEOUT_S}")
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines reach the prefixes as they are printed
    return env


def _command(argv: Sequence[str]) -> list[str]:
    """``argv`` as a program to run: a sparsejax command runs under this interpreter."""
    from sparsejax.harness.cli import build_parser

    _, handlers = build_parser()
    if argv[0] in handlers:
        return [sys.executable, "-m", "sparsejax.harness.cli", *argv]
    return list(argv)


def _relay(index: int, stream: IO[bytes], out: IO[str], lock: threading.Lock) -> None:
    """Copy ``stream`` to ``out`` line by line, each line prefixed with ``[index]`` (a
    progress bar's carriage returns end lines too)."""
    for raw in iter(stream.readline, b""):
        lines = raw.decode(errors="replace").rstrip("\r\n").split("\r")
        with lock:
            out.writelines(f"[{index}] {line}\n" for line in lines if line)
            out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (128 + N for a signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _stop(processes: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM the processes still running, SIGKILL those left after ``grace`` seconds."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(num_processes: int, argv: Sequence[str], *, devices_per_process: int | None = None,
           port: int | None = None, out: IO[str] | None = None, grace: float = 5.0,
           on_start: Callable[[list[subprocess.Popen[bytes]]], Any] | None = None) -> int:
    """Run ``argv`` as ``num_processes`` coordinated processes; return the exit code.

    0 when every process exits 0; else the code of the first process that failed, after
    the others are stopped (SIGTERM, then SIGKILL after ``grace`` seconds). Their output,
    stdout and stderr together, goes to ``out`` (default: stdout), each line prefixed
    with ``[process id]``.
    """
    if not is_int(num_processes) or num_processes < 1:
        raise ValueError(f"-n must be a positive number of processes, got {num_processes!r}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if not isinstance(grace, (int, float)) or not 0 <= grace < float("inf"):
        raise ValueError(f"--grace must be a number of seconds >= 0, got {grace!r}")
    if not argv:
        raise ValueError("nothing to launch: give the command after --, e.g. "
                         "sparsejax launch -n 2 -- train --parallel sharded")
    if port is not None:
        check_port(port)  # before any process starts: a busy port crashed process 0
    command = _command(argv)
    warning = oversubscription_warning(num_processes, devices_per_process, os.cpu_count())
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    port = free_port() if port is None else port
    out = sys.stdout if out is None else out
    lock = threading.Lock()
    processes: list[subprocess.Popen[bytes]] = []
    relays: list[threading.Thread] = []
    failed: int | None = None
    try:
        for i in range(num_processes):
            p = subprocess.Popen(command, env=process_env(i, num_processes, port,
                                                          devices_per_process),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            processes.append(p)
            relay = threading.Thread(target=_relay, args=(i, p.stdout, out, lock), daemon=True)
            relay.start()
            relays.append(relay)
        if on_start is not None:
            on_start(processes)
        while failed is None and any(p.poll() is None for p in processes):
            failed = next((p.returncode for p in processes if p.poll() not in (None, 0)), None)
            time.sleep(0.05)
        if failed is None:
            failed = next((p.returncode for p in processes if p.returncode), None)
    finally:
        _stop(processes, grace)  # a failure, or an interrupt of the launcher itself
        for relay in relays:
            relay.join(timeout=grace)
    if failed is not None:
        with lock:
            out.write(f"sparsejax launch: a process exited with status {_exit_code(failed)}; "
                      "the others were stopped\n")
            out.flush()
        return _exit_code(failed)
    return 0


def _launch_command(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    # a launcher stopped by SIGTERM stops its processes too (launch's finally)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return launch(args.num_processes, argv, devices_per_process=args.devices_per_process,
                      port=args.port, grace=args.grace)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def add_commands(commands: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``launch`` to the ``sparsejax`` parser."""
    launch_parser = commands.add_parser(
        "launch", help="run a command as several coordinated JAX processes on this machine",
        description="Start N processes of COMMAND that form one JAX job (jax.distributed, "
                    "a coordinator on a free local port), e.g. "
                    "sparsejax launch -n 2 --devices-per-process 4 -- train --parallel "
                    "sharded. A process that fails stops the others.")
    launch_parser.add_argument("-n", "--num-processes", type=int, required=True,
                               help="how many processes, >= 1")
    launch_parser.add_argument("--devices-per-process", type=int, default=None,
                               help="simulated CPU devices per process (sets XLA's "
                                    f"{_DEVICE_FLAG}); default: the real devices")
    launch_parser.add_argument("--port", type=int, default=None,
                               help="the coordinator's local port, free, in [1, 65535] "
                                    "(default: a free one)")
    launch_parser.add_argument("--grace", type=float, default=5.0,
                               help="seconds the others get to stop after one fails, then "
                                    "SIGKILL (a JAX process waiting on a dead peer may "
                                    "catch SIGTERM: jax.distributed's preemption notice)")
    launch_parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                               help="a sparsejax command (train ...) or a program to run")
    return {"launch": _launch_command}
