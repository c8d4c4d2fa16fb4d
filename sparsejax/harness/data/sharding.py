"""Multi-host data parallelism: each process takes its contiguous slice of a global batch
(:func:`shard_for_process`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sparsejax.harness.data.dataset import Batch

__all__ = ["shard_for_process"]


def shard_for_process(
    batch: Mapping[str, np.ndarray], process_index: int, process_count: int
) -> Batch:
    """This process's contiguous slice of a global batch (multi-host data parallelism).

    >>> batch = {"image": np.arange(8).reshape(4, 2), "label": np.arange(4)}
    >>> shard_for_process(batch, process_index=1, process_count=2)["label"]
    array([2, 3])
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    leading_sizes = {key: len(value) for key, value in batch.items()}
    if len(set(leading_sizes.values())) != 1:
        raise ValueError(f"batch arrays must share one leading size, got {leading_sizes}")
    global_size = next(iter(leading_sizes.values()))
    if global_size % process_count:
        raise ValueError(
            f"global batch size {global_size} is not divisible by {process_count} processes"
        )
    per_process = global_size // process_count
    begin = process_index * per_process
    return {key: value[begin:begin + per_process] for key, value in batch.items()}
