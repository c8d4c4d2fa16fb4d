"""Exact top-k threshold: candidate algorithms against each other, per backend.

For n scores and k = n / 10 each candidate returns the exact k-th largest score:

* ``sampled``   what ``sparsejax.topk_mask_tracked`` (a top-k every step) uses above
                2048 scores: cuts seeded by a strided sample (or the previous call's
                cut), then placed by interpolating counts, a few counting passes in all
                (plus the masks and one pass here that turns them into the value);
* ``bitwise``   32 compare-and-count passes over an order-preserving uint32 key (what
                ``sparsejax.topk_mask`` uses: a program that compiles several times
                faster, for calls made once or every few hundred steps);
* ``radix8``    4 passes, each a 256-bin histogram of one byte of the key among the
                entries that match the prefix found so far;
* ``sort``      ``jnp.sort`` and index;
* ``top_k``     ``lax.top_k`` and take the last;
* ``approx``    ``lax.approx_max_k`` with recall 1.0 (exact on CPU/GPU; the TPU path).

Every timing is the median of several calls of the compiled function after warm-up,
and every candidate is checked against ``sort``. ``--json FILE`` writes one row per
(algorithm, size) with ``ms``, ``ns_per_score`` and ``backend``; the per-size
``ns_per_score`` of ``sampled`` and ``bitwise`` is the scaling check (flat = linear).

    python benchmarks/topk.py --json benchmarks/results/topk_cpu.json
    python benchmarks/topk.py --sizes 1e4 1e5 1e6 1e7 1e8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from step_time import host, write_json  # same folder

from sparsejax.core.topk import kth_largest
from sparsejax.core.topk_sampled import sampled_topk
from sparsejax.core.topk_search import key_value, order_key


def sampled(x: jax.Array, k: int) -> jax.Array:
    masks, _ = sampled_topk(x.reshape(1, -1), jnp.full((1,), k, jnp.int32))
    return jnp.min(jnp.where(masks[0], x.ravel(), jnp.inf))


def bitwise(x: jax.Array, k: int) -> jax.Array:
    return kth_largest(x, k)


def radix8(x: jax.Array, k: int) -> jax.Array:
    key = order_key(x)
    prefix = jnp.uint32(0)
    remaining = jnp.int32(k)
    for level in range(4):
        shift = 24 - 8 * level
        high_mask = jnp.uint32(0) if level == 0 else jnp.uint32((0xFFFFFFFF << (shift + 8)) &
                                                               0xFFFFFFFF)
        match = (key & high_mask) == prefix
        digit = ((key >> shift) & jnp.uint32(0xFF)).astype(jnp.int32)
        hist = jnp.zeros(256, jnp.int32).at[digit].add(match.astype(jnp.int32))
        above = jnp.cumsum(hist[::-1])[::-1]  # entries with digit >= d
        chosen = jnp.max(jnp.where(above >= remaining, jnp.arange(256), -1))
        remaining = remaining - jnp.where(chosen < 255, above[jnp.minimum(chosen + 1, 255)], 0)
        prefix = prefix | (chosen.astype(jnp.uint32) << shift)
    return key_value(prefix)


def sort(x: jax.Array, k: int) -> jax.Array:
    return jnp.sort(x)[x.size - k]


def top_k(x: jax.Array, k: int) -> jax.Array:
    return lax.top_k(x, k)[0][-1]


def approx(x: jax.Array, k: int) -> jax.Array:
    return lax.approx_max_k(x, k, recall_target=1.0)[0][-1]


CANDIDATES: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "sampled": sampled, "bitwise": bitwise, "radix8": radix8, "sort": sort, "top_k": top_k,
    "approx": approx,
}


def time_compiled(fn: Callable[[], jax.Array], repeats: int) -> float:
    fn().block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_topk(sizes: list[float], algorithms: list[str], density: float = 0.1,
              max_slow_size: float = 1e7, deadline: float | None = None) -> list[dict]:
    """One row per (size, algorithm): the compiled time of finding the exact k-th largest
    of ``size`` scores (k = ``density`` x size), each checked against ``sort``; past
    ``deadline`` (``time.monotonic()``) the sizes not yet started are skipped."""
    rows = []
    backend = jax.default_backend()
    for size in map(int, sizes):
        if deadline is not None and time.monotonic() > deadline:
            print(f"skip n={size}: past the deadline")
            continue
        x = jax.random.normal(jax.random.PRNGKey(0), (size,))
        k = max(1, int(density * size))
        reference = float(jnp.sort(x)[size - k]) if size <= max_slow_size else None
        for name in algorithms:
            if name not in ("sampled", "bitwise", "radix8") and size > max_slow_size:
                continue
            fn = jax.jit(lambda v, f=CANDIDATES[name], k=k: f(v, k))
            value = float(fn(x))
            if reference is not None and value != reference:
                raise AssertionError(f"{name} gave {value}, expected {reference} at n={size}")
            repeats = 20 if size <= 1e6 else 5
            ms = time_compiled(lambda fn=fn, x=x: fn(x), repeats)
            rows.append({"algorithm": name, "size": size, "k": k, "ms": round(ms, 4),
                         "ns_per_score": round(ms * 1e6 / size, 3), **host()})
            print(f"{backend:4s} n={size:>10,d} {name:8s} {ms:10.3f} ms "
                  f"{ms * 1e6 / size:8.2f} ns/score", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--algorithms", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--max-slow-size", type=float, default=1e7,
                        help="skip sort/top_k/approx above this size (they take seconds)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows = time_topk(args.sizes, args.algorithms, args.density, args.max_slow_size)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
