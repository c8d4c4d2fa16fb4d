"""The SparseGPT walk over one kernel (see :func:`sparsejax.posttrain.pruners.sparsegpt_prune`,
which checks the arguments and documents the algorithm), compiled once per shapes,
pattern and blocksize."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.core.patterns import Pattern, topk_rows
from sparsejax.core.topk import topk_mask

__all__ = ["sparsegpt_walk"]


@functools.partial(jax.jit, static_argnames=("pattern", "blocksize", "zero_dead_inputs"))
def sparsegpt_walk(kernel: jax.Array, hessian: jax.Array, percdamp: jax.Array,
                   block_counts: jax.Array, *, pattern: Pattern, blocksize: int,
                   zero_dead_inputs: bool = True) -> tuple[jax.Array, jax.Array]:
    """The SparseGPT walk (see :func:`~sparsejax.posttrain.pruners.sparsegpt_prune`, which
    checks its arguments) on ``W = kernel.T``: ``(pruned kernel, mask)``, one compiled
    program per pattern and block size."""
    weights = kernel.T  # (out, in): column j holds input j's weight in every output row
    per_group = pattern.fixed_density is not None  # N:M (checked: else unstructured)
    n_out, n_in = weights.shape
    unseen = jnp.diagonal(hessian) == 0  # inputs the calibration data never uses
    if zero_dead_inputs:  # the reference: W[:, dead] = 0, pruned whatever the count
        weights = jnp.where(unseen[None, :], 0.0, weights)
    hessian = hessian + jnp.diag(jnp.where(unseen, 1.0, 0.0))
    damp = percdamp * jnp.mean(jnp.diagonal(hessian))
    hessian = hessian + damp * jnp.eye(n_in, dtype=jnp.float32)
    lower = jax.scipy.linalg.cholesky(hessian, lower=True)
    hessian_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(n_in, dtype=jnp.float32))
    upper = jax.scipy.linalg.cholesky(hessian_inv, lower=False)  # H^-1 = U^T U

    n_blocks, tail = divmod(n_in, blocksize)
    columns = jnp.arange(n_in)

    def saliency(w: jax.Array, d: jax.Array, unseen: jax.Array) -> jax.Array:
        # an unseen input's weight costs nothing on the calibration data: OBS error 0
        return jnp.where(unseen, 0.0, jnp.square(w) / jnp.square(d))

    def prune_block(index: jax.Array | int, carry: tuple[jax.Array, jax.Array],
                    width: int = blocksize) -> tuple[jax.Array, jax.Array]:
        """Block ``index`` (columns ``index * blocksize`` on, ``width`` of them): choose
        its mask, walk its columns, and move the trailing columns by its errors."""
        weights, mask = carry
        start = index * blocksize
        block = lax.dynamic_slice_in_dim(weights, start, width, axis=1)
        block_upper = lax.dynamic_slice(upper, (start, start), (width, width))
        block_diag = jnp.diagonal(block_upper)
        block_unseen = lax.dynamic_slice_in_dim(unseen, start, width)
        if not per_group:  # unstructured: the block's count, chosen up front
            keep = topk_mask(saliency(block, block_diag[None, :], block_unseen[None, :]),
                             count=block_counts[index], check_finite_scores=False)
        else:
            keep = jnp.ones((n_out, width), bool)

        def column(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array],
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
            block, errors, keep = carry
            if per_group:
                m = pattern.m

                def choose(keep: jax.Array) -> jax.Array:
                    group = lax.dynamic_slice(block, (0, j), (n_out, m))
                    group_diag = lax.dynamic_slice(block_diag, (j,), (m,))
                    group_unseen = lax.dynamic_slice(block_unseen, (j,), (m,))
                    scores = saliency(group, group_diag[None, :], group_unseen[None, :])
                    group_keep = topk_rows(scores, pattern.n)  # N of every row of M
                    return lax.dynamic_update_slice(keep, group_keep, (0, j))

                keep = lax.cond(j % m == 0, choose, lambda keep: keep, keep)
            w = lax.dynamic_index_in_dim(block, j, axis=1, keepdims=False)
            kept = lax.dynamic_index_in_dim(keep, j, axis=1, keepdims=False)
            q = jnp.where(kept, w, 0.0)
            error = (w - q) / block_upper[j, j]
            row = lax.dynamic_index_in_dim(block_upper, j, axis=0, keepdims=False)
            block = block - error[:, None] * row[None, :]  # U is upper: columns > j move
            block = lax.dynamic_update_index_in_dim(block, q, j, axis=1)  # exact zeros
            errors = lax.dynamic_update_index_in_dim(errors, error, j, axis=1)
            return block, errors, keep

        errors = jnp.zeros((n_out, width), jnp.float32)
        block, errors, keep = lax.fori_loop(0, width, column, (block, errors, keep))
        # The trailing columns move by the block's errors. U's rows of this block are zero
        # left of it, so the product over every column changes nothing there; the block's
        # own columns are set from the walk.
        rows = lax.dynamic_slice_in_dim(upper, start, width, axis=0)
        moved = jnp.matmul(errors, rows, precision=lax.Precision.HIGHEST)
        weights = weights - jnp.where(columns >= start + width, moved, 0.0)
        weights = lax.dynamic_update_slice_in_dim(weights, block, start, axis=1)
        mask = lax.dynamic_update_slice_in_dim(mask, keep, start, axis=1)
        return weights, mask

    # One compiled block for all full blocks (a loop, not one copy per block: the compile
    # time no longer grows with the width), and one for a narrower last block.
    carry = (weights, jnp.zeros((n_out, n_in), bool))
    if n_blocks:
        carry = lax.fori_loop(0, n_blocks, prune_block, carry)
    if tail:
        carry = prune_block(n_blocks, carry, width=tail)
    weights, mask = carry
    if zero_dead_inputs:
        mask = mask & ~unseen[None, :]
    return jnp.where(mask, weights, 0.0).T, mask.T
