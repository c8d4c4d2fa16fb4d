"""The SparseGPT walk over one kernel (see :func:`sparsejax.posttrain.sparsegpt_prune`,
which checks the arguments and documents the algorithm), compiled once per shapes,
pattern and blocksize."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.patterns import Pattern, _topk_rows
from sparsejax.topk import topk_mask


@functools.partial(jax.jit, static_argnames=("pattern", "blocksize"))
def _sparsegpt(kernel: jax.Array, hessian: jax.Array, percdamp: jax.Array,
               block_counts: jax.Array, *, pattern: Pattern,
               blocksize: int) -> tuple[jax.Array, jax.Array]:
    """The SparseGPT walk (see :func:`sparsegpt_prune`) on ``W = kernel.T``."""
    weights = kernel.T  # (out, in): column j holds input j's weight in every output row
    n_out, n_in = weights.shape
    unseen = jnp.diagonal(hessian) == 0  # inputs the calibration data never uses
    hessian = hessian + jnp.diag(jnp.where(unseen, 1.0, 0.0))
    damp = percdamp * jnp.mean(jnp.diagonal(hessian))
    hessian = hessian + damp * jnp.eye(n_in, dtype=jnp.float32)
    lower = jax.scipy.linalg.cholesky(hessian, lower=True)
    hessian_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(n_in, dtype=jnp.float32))
    upper = jax.scipy.linalg.cholesky(hessian_inv, lower=False)  # H^-1 = U^T U

    masks = []
    for index, start in enumerate(range(0, n_in, blocksize)):
        end = min(start + blocksize, n_in)
        width = end - start
        block = weights[:, start:end]
        block_upper = upper[start:end, start:end]
        block_diag = jnp.diagonal(block_upper)
        block_unseen = unseen[start:end]

        def saliency(w: jax.Array, d: jax.Array, unseen: jax.Array) -> jax.Array:
            # an unseen input's weight costs nothing on the calibration data: OBS error 0
            return jnp.where(unseen, 0.0, jnp.square(w) / jnp.square(d))

        if pattern.kind == "unstructured":
            keep = topk_mask(saliency(block, block_diag[None, :], block_unseen[None, :]),
                             count=block_counts[index], check_finite_scores=False)
        else:
            keep = jnp.ones((n_out, width), bool)

        def column(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array],
                   block_upper: jax.Array = block_upper, block_diag: jax.Array = block_diag,
                   block_unseen: jax.Array = block_unseen,
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
            block, errors, keep = carry
            if pattern.kind == "nm":
                m = pattern.m

                def choose(keep: jax.Array) -> jax.Array:
                    group = lax.dynamic_slice(block, (0, j), (n_out, m))
                    group_diag = lax.dynamic_slice(block_diag, (j,), (m,))
                    group_unseen = lax.dynamic_slice(block_unseen, (j,), (m,))
                    scores = saliency(group, group_diag[None, :], group_unseen[None, :])
                    group_keep = _topk_rows(scores, pattern.n)  # N of every row of M
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
        weights = weights.at[:, start:end].set(block)
        if end < n_in:
            weights = weights.at[:, end:].add(
                -jnp.matmul(errors, upper[start:end, end:], precision=lax.Precision.HIGHEST))
        masks.append(keep)
    mask = jnp.concatenate(masks, axis=1)
    return jnp.where(mask, weights, 0.0).T, mask.T
