"""Post-training, one-shot pruning of a trained layer from calibration inputs.

Three pure functions prune one Dense kernel (Flax layout ``(in, out)``, ``y = x @ W``)
given calibration inputs ``X`` of shape ``(tokens, in)``, each returning the pruned kernel
and its mask (:class:`PrunedLayer`):

* :func:`magnitude_prune`: keep the largest ``|W|`` (no calibration data);
* :func:`wanda_prune` (Sun et al. 2024): keep the largest ``|W_ij| * ||X_i||_2``, compared
  within each output neuron (a kernel column; unstructured) or within each group of ``M``
  inputs (N:M); no weight update;
* :func:`sparsegpt_prune` (Frantar & Alistarh 2023): walk the input columns in blocks,
  choose each block's mask by the optimal-brain-surgeon saliency ``w^2 / [H_F^-1]_jj``
  (``H = X^T X`` over the calibration tokens, ``F`` the columns not yet processed) and
  update the columns not yet processed to compensate each pruned weight.

:func:`wanda_prune_hessian`, :func:`sparsegpt_prune_hessian` and
:func:`prune_layer_hessian` take ``H = X^T X`` instead of ``X`` (Wanda needs only its
diagonal ``||X_i||^2``), so ``H`` can be summed over calibration batches;
:func:`sparsejax.posttrain.sequential.prune_sequential` drives them over a whole model,
layer after layer. Memory is bounded by one layer's ``in x in`` Hessian.

``sparsity`` is the fraction removed. For an N:M pattern it may be omitted; if given it
must be ``1 - N / M``.

>>> import jax, jax.numpy as jnp
>>> kernel = jax.random.normal(jax.random.key(0), (8, 3))
>>> inputs = jax.random.normal(jax.random.key(1), (64, 8))
>>> pruned = sparsegpt_prune(kernel, inputs, "2:4")
>>> pruned.mask.reshape(2, 4, 3).sum(axis=1).tolist()  # 2 of every 4 inputs, per output
[[2, 2, 2], [2, 2, 2]]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.core.patterns import (
    NM,
    Pattern,
    as_pattern,
    pattern_density,
    pattern_mask,
    per_output_mask,
)
from sparsejax.core.topk import num_kept
from sparsejax.core.validation import (
    check_finite,
    check_finite_number,
    check_int,
    check_sparsity,
    is_concrete,
)
from sparsejax.posttrain.registry import (
    POSTTRAIN_METHODS,
    PosttrainPruner,
    check_posttrain_method,
    check_posttrain_pattern,
    posttrain_pruner,
    register_posttrain_method,
)
from sparsejax.posttrain.sparsegpt import sparsegpt_walk

__all__ = [
    "PrunedLayer",
    "PosttrainMethod",
    "POSTTRAIN_METHODS",
    "check_posttrain_method",
    "check_posttrain_pattern",
    "posttrain_density",
    "magnitude_prune",
    "wanda_prune",
    "sparsegpt_prune",
    "wanda_scores",
    "input_hessian",
    "reconstruction_error",
    "prune_layer",
    "wanda_prune_hessian",
    "sparsegpt_prune_hessian",
    "hessian_reconstruction_error",
    "prune_layer_hessian",
]

PosttrainMethod = str  # a registered name: "magnitude", "wanda", "sparsegpt", ...
_BLOCKSIZE = 128  # sparsegpt's default block of input columns


def _sparsegpt_pattern(pattern: Pattern, blocksize: int = _BLOCKSIZE,
                       **options: Any) -> Pattern:
    """SparseGPT's patterns: unstructured, and N:M along the input axis in whole blocks."""
    del options
    check_int(blocksize, "blocksize", minimum=1)
    if isinstance(pattern, NM):
        if pattern.axis not in (-2, 0):
            raise ValueError(f"sparsegpt prunes N:M along the kernel's input axis (-2 or 0),"
                             f" got pattern {pattern}")
        if blocksize % pattern.m:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m} "
                             f"for pattern {pattern}")
    elif not pattern.ranks_globally:
        raise ValueError(f"sparsegpt supports the unstructured and N:M patterns, got "
                         f"{pattern}")
    return pattern


class PrunedLayer(NamedTuple):
    """A pruned kernel (zero where ``mask`` is ``False``) and its boolean mask."""

    kernel: jax.Array
    mask: jax.Array


def posttrain_density(pattern: str | Pattern, sparsity: Any, name: str = "sparsity") -> Any:
    """The density to keep from a ``sparsity`` (fraction removed; ``name`` in messages) and
    a pattern: required unless the pattern fixes it (N:M), and then it must agree.

    >>> posttrain_density("2:4", None), posttrain_density("unstructured", 0.75)
    (0.5, 0.25)
    """
    pattern = as_pattern(pattern)
    if sparsity is None:
        if pattern.fixed_density is None:
            raise ValueError(f"pattern {pattern} needs a {name} (fraction removed); only "
                             "N:M fixes it")
        return pattern.fixed_density
    check_sparsity(sparsity, name)
    return pattern_density(pattern, 1.0 - float(sparsity))


def _check_kernel(kernel: Any, inputs: Any = None,
                  required: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """``kernel`` as a float32 ``(in, out)`` array and ``inputs`` as float32
    ``(tokens, in)``; ``ValueError`` for other shapes or non-finite values."""
    kernel = jnp.asarray(kernel)
    if inputs is None and required:
        raise ValueError("this method needs calibration inputs (tokens, in); got None")
    if kernel.ndim != 2:
        raise ValueError(f"post-training pruning takes a Dense kernel (in, out), got shape "
                         f"{kernel.shape}")
    check_finite(kernel, "kernel")
    if inputs is None:
        return kernel, None
    inputs = jnp.asarray(inputs, jnp.float32)
    if inputs.ndim < 1 or inputs.shape[-1] != kernel.shape[0]:
        raise ValueError(f"calibration inputs must end in the kernel's input size "
                         f"{kernel.shape[0]}, got shape {inputs.shape}")
    inputs = inputs.reshape(-1, kernel.shape[0])
    if inputs.shape[0] == 0:
        raise ValueError("calibration inputs hold no tokens")
    check_finite(inputs, "calibration inputs")
    return kernel, inputs


def magnitude_prune(kernel: jax.Array, pattern: str | Pattern = "unstructured",
                    sparsity: float | None = None) -> PrunedLayer:
    """Keep the largest ``|kernel|`` entries in ``pattern`` (unstructured: per layer).

    >>> import jax.numpy as jnp
    >>> magnitude_prune(jnp.array([[1.0, -4.0], [3.0, 2.0]]), sparsity=0.5).kernel
    Array([[ 0., -4.],
           [ 3.,  0.]], dtype=float32)
    """
    pattern = as_pattern(pattern)
    kernel, _ = _check_kernel(kernel)
    mask = pattern_mask(jnp.abs(kernel), pattern, posttrain_density(pattern, sparsity))
    return PrunedLayer(jnp.where(mask, kernel, 0).astype(kernel.dtype), mask)


def wanda_scores(kernel: jax.Array, inputs: jax.Array | None = None, *,
                 norms: jax.Array | None = None) -> jax.Array:
    """Wanda's importance ``|W_ij| * ||X_i||_2`` (``i`` the input, over all tokens), from
    the inputs or from their per-input ``norms``."""
    if norms is None:
        norms = jnp.sqrt(jnp.sum(jnp.square(inputs.astype(jnp.float32)), axis=0))
    return jnp.abs(kernel.astype(jnp.float32)) * norms[:, None]


def wanda_prune(kernel: jax.Array, inputs: jax.Array, pattern: str | Pattern = "unstructured",
                sparsity: float | None = None, per_output: bool = True) -> PrunedLayer:
    """Wanda: keep the largest ``|W_ij| * ||X_i||_2``; unstructured, every output neuron
    (kernel column) keeps the same fraction (``per_output=False``: one top-k over the
    whole layer, the paper's ablation of the comparison group); N:M, ``N`` of each group
    of ``M`` inputs; block and channel, as :func:`~sparsejax.core.patterns.pattern_mask` of
    these scores.

    >>> import jax.numpy as jnp
    >>> kernel = jnp.array([[1.0, 1.0], [2.0, 2.0]])
    >>> inputs = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # input norms 5 and 1
    >>> wanda_prune(kernel, inputs, sparsity=0.5).mask
    Array([[ True,  True],
           [False, False]], dtype=bool)
    """
    kernel, inputs = _check_kernel(kernel, inputs, required=True)
    return _wanda(kernel, wanda_scores(kernel, inputs), pattern, sparsity, per_output)


def wanda_prune_hessian(kernel: jax.Array, hessian: jax.Array,
                        pattern: str | Pattern = "unstructured", sparsity: float | None = None,
                        per_output: bool = True) -> PrunedLayer:
    """:func:`wanda_prune` from ``H = X^T X`` (only its diagonal ``||X_i||^2`` is used).

    >>> import jax.numpy as jnp
    >>> kernel = jnp.array([[1.0, 1.0], [2.0, 2.0]])
    >>> wanda_prune_hessian(kernel, jnp.diag(jnp.array([25.0, 1.0])), sparsity=0.5).mask
    Array([[ True,  True],
           [False, False]], dtype=bool)
    """
    kernel, hessian = _check_hessian(kernel, hessian)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(hessian), 0.0))
    return _wanda(kernel, wanda_scores(kernel, norms=norms), pattern,
                  sparsity, per_output)


def _wanda(kernel: jax.Array, scores: jax.Array, pattern: str | Pattern, sparsity: Any,
           per_output: bool) -> PrunedLayer:
    pattern = as_pattern(pattern)
    density = posttrain_density(pattern, sparsity)
    if pattern.ranks_globally and per_output:  # single weights, compared per output
        mask = per_output_mask(scores, density)
    else:
        mask = pattern_mask(scores, pattern, density)
    return PrunedLayer(jnp.where(mask, kernel, 0).astype(kernel.dtype), mask)


def _check_hessian(kernel: Any, hessian: Any) -> tuple[jax.Array, jax.Array]:
    """``kernel`` checked as by :func:`_check_kernel` and ``hessian`` as a finite float32
    ``(in, in)`` array; ``ValueError`` otherwise."""
    kernel, _ = _check_kernel(kernel)
    if hessian is None:
        raise ValueError("this method needs the calibration Hessian X^T X (in, in); got None")
    hessian = jnp.asarray(hessian, jnp.float32)
    if hessian.shape != (kernel.shape[0],) * 2:
        raise ValueError(f"the Hessian X^T X must be (in, in) = {(kernel.shape[0],) * 2} for "
                         f"a kernel of shape {kernel.shape}, got shape {hessian.shape}")
    check_finite(hessian, "Hessian")
    return kernel, hessian


@jax.jit
def input_hessian(inputs: jax.Array) -> jax.Array:
    """``H = X^T X`` (float32, ``(in, in)``) summed over the calibration tokens: the
    Hessian of the layer's reconstruction error ``||X W - X W'||^2`` (up to a factor 2).

    >>> import jax.numpy as jnp
    >>> input_hessian(jnp.array([[1.0, 2.0], [0.0, 1.0]]))
    Array([[1., 2.],
           [2., 5.]], dtype=float32)
    """
    inputs = inputs.astype(jnp.float32)
    return jnp.matmul(inputs.T, inputs, precision=lax.Precision.HIGHEST)


def sparsegpt_prune(kernel: jax.Array, inputs: jax.Array,
                    pattern: str | Pattern = "unstructured", sparsity: float | None = None,
                    blocksize: int = _BLOCKSIZE, percdamp: float = 0.01,
                    zero_dead_inputs: bool = True) -> PrunedLayer:
    """SparseGPT: prune with optimal-brain-surgeon updates of the remaining weights.

    In the paper's layout ``W`` is ``(out, in)`` (here ``kernel.T``). ``H = X^T X`` is
    dampened by ``percdamp`` times its mean diagonal (inputs the calibration data never
    uses, ``H_jj == 0``, get ``H_jj = 1`` first, and saliency 0: pruning them costs
    nothing there). ``zero_dead_inputs`` (default, the reference code's ``W[:, dead] =
    0``): their weights are all pruned, so where more inputs are dead than the sparsity
    removes the layer keeps less than asked; ``False``: they are pruned first but the
    count stays exact, the rest of it kept on dead inputs' weights;
    ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), so that
    ``U_jj^2 = [H_F^-1]_jj`` for ``F = {j, j+1, ...}``, the columns not yet processed.
    Columns go in blocks of ``blocksize``. Unstructured: at each block's start, the block
    keeps ``num_kept(density, out * width)`` of its weights by the saliency
    ``w^2 / U_jj^2``; N:M: at each group's start, each row keeps the ``N`` most salient
    of its ``M`` group columns. Then for each column ``j`` of the block, every pruned
    ``w_j`` is set to zero and the columns after it in the block take
    ``-(w_j / U_jj) * U_{j, j+1:}`` (the OBS update); the later blocks take the block's
    updates at once (``-E U_{block, later}``, lazy batch update).

    Pruning a single column ``q`` at the start of the walk thus gives the textbook OBS
    ``w' = w - (w_q / [H^-1]_qq) H^-1_{:, q}``, the least-squares best ``w'`` with
    ``w'_q = 0``. Float32 throughout; compiled once per shapes, pattern and blocksize.

    >>> import jax, jax.numpy as jnp
    >>> kernel = jax.random.normal(jax.random.key(0), (16, 4))
    >>> inputs = jax.random.normal(jax.random.key(1), (128, 16))
    >>> pruned = sparsegpt_prune(kernel, inputs, sparsity=0.5, blocksize=8)
    >>> int(pruned.mask.sum()), bool(jnp.all(pruned.kernel[~pruned.mask] == 0))
    (32, True)
    """
    kernel, inputs = _check_kernel(kernel, inputs, required=True)
    return sparsegpt_prune_hessian(kernel, input_hessian(inputs), pattern, sparsity,
                                   blocksize, percdamp, zero_dead_inputs)


def sparsegpt_prune_hessian(kernel: jax.Array, hessian: jax.Array,
                            pattern: str | Pattern = "unstructured",
                            sparsity: float | None = None, blocksize: int = _BLOCKSIZE,
                            percdamp: float = 0.01, zero_dead_inputs: bool = True) -> PrunedLayer:
    """:func:`sparsegpt_prune` from ``H = X^T X`` (e.g. summed over calibration batches)
    instead of the inputs ``X``: the same walk, the same result for the same ``H``."""
    pattern = check_posttrain_pattern("sparsegpt", pattern, blocksize=blocksize)
    kernel, hessian = _check_hessian(kernel, hessian)
    density = posttrain_density(pattern, sparsity)
    check_finite_number(percdamp, "percdamp")
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    pattern.check_shape(kernel.shape, where="kernel")
    n_in, n_out = kernel.shape
    # the count each block keeps (unstructured), on the host: the library's rounding
    block_counts = np.array([num_kept(density, n_out * (min(start + blocksize, n_in) - start))
                             for start in range(0, n_in, blocksize)], np.int32)
    new_kernel, mask = sparsegpt_walk(kernel.astype(jnp.float32), hessian,
                                  jnp.float32(percdamp), block_counts,
                                  pattern=pattern, blocksize=int(blocksize),
                                  zero_dead_inputs=bool(zero_dead_inputs))
    return PrunedLayer(new_kernel.astype(kernel.dtype), mask)


def reconstruction_error(kernel: jax.Array, pruned_kernel: jax.Array,
                         inputs: jax.Array) -> jax.Array:
    """Relative reconstruction error ``||X W - X W'||_F / ||X W||_F`` on ``inputs`` X.

    >>> import jax.numpy as jnp
    >>> float(reconstruction_error(jnp.eye(2), jnp.diag(jnp.array([1.0, 0.0])), jnp.eye(2)))
    0.7071067690849304
    """
    inputs = jnp.asarray(inputs, jnp.float32).reshape(-1, jnp.shape(kernel)[0])
    dense = jnp.matmul(inputs, jnp.asarray(kernel, jnp.float32),
                       precision=lax.Precision.HIGHEST)
    diff = dense - jnp.matmul(inputs, jnp.asarray(pruned_kernel, jnp.float32),
                              precision=lax.Precision.HIGHEST)
    return jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(dense), 1e-30)


def prune_layer(method: PosttrainMethod, kernel: jax.Array, inputs: jax.Array | None,
                pattern: str | Pattern = "unstructured", sparsity: float | None = None,
                **options: Any) -> PrunedLayer:
    """One layer by ``method`` (``'magnitude'``, ``'wanda'`` or ``'sparsegpt'``);
    ``options`` go to :func:`wanda_prune` (``per_output``) or :func:`sparsegpt_prune`
    (``blocksize``, ``percdamp``).

    >>> import jax.numpy as jnp
    >>> prune_layer("magnitude", jnp.array([[1.0, 2.0]]), None, "channel", 0.5).mask
    Array([[False,  True]], dtype=bool)
    """
    return _prune(method, False, kernel, inputs, pattern, sparsity, options)


def _prune(method: str, hessian: bool, kernel: jax.Array, data: jax.Array | None,
           pattern: str | Pattern, sparsity: float | None,
           options: dict[str, Any]) -> PrunedLayer:
    """:func:`prune_layer` (``data`` the inputs) or, with ``hessian``,
    :func:`prune_layer_hessian` (``data`` the Hessian): one dispatch for both."""
    pruner = posttrain_pruner(method)
    prune = pruner.from_hessian if hessian else pruner.from_inputs
    layer = prune(kernel, data, pattern, sparsity, **options)
    _check_pruned(method, kernel, layer)
    return layer


def _check_pruned(method: str, kernel: jax.Array, layer: Any) -> None:
    """``ValueError`` unless an algorithm (a registered one may be the user's) returned a
    ``PrunedLayer`` whose bool mask has the kernel's shape and whose kernel is zero
    wherever the mask prunes: a pruned weight left non-zero would count as pruned in the
    reports and still act in the forward pass. The values are checked when concrete."""
    shape = tuple(np.shape(kernel))
    if (not isinstance(layer, PrunedLayer) or tuple(np.shape(layer.kernel)) != shape
            or tuple(np.shape(layer.mask)) != shape or jnp.result_type(layer.mask) != jnp.bool_):
        raise ValueError(f"post-training method {method!r} must return a PrunedLayer whose "
                         f"kernel and bool mask have the kernel's shape {shape}")
    if is_concrete(layer.kernel) and is_concrete(layer.mask) and bool(
            jnp.any(jnp.where(layer.mask, 0, layer.kernel) != 0)):
        raise ValueError(f"post-training method {method!r} left weights non-zero where its "
                         "mask prunes them")


def hessian_reconstruction_error(kernel: jax.Array, pruned_kernel: jax.Array,
                                 hessian: jax.Array) -> jax.Array:
    """:func:`reconstruction_error` from ``H = X^T X``: ``sqrt(tr(dW^T H dW) / tr(W^T H W))``
    with ``dW = W - W'`` (``||X dW||_F^2 = tr(dW^T H dW)``).

    >>> import jax.numpy as jnp
    >>> float(hessian_reconstruction_error(jnp.eye(2), jnp.diag(jnp.array([1.0, 0.0])),
    ...                                    jnp.eye(2)))
    0.7071067690849304
    """
    hessian = jnp.asarray(hessian, jnp.float32)
    kernel = jnp.asarray(kernel, jnp.float32)
    diff = kernel - jnp.asarray(pruned_kernel, jnp.float32)

    def energy(w: jax.Array) -> jax.Array:
        return jnp.sum(w * jnp.matmul(hessian, w, precision=lax.Precision.HIGHEST))

    return jnp.sqrt(jnp.maximum(energy(diff), 0.0) / jnp.maximum(energy(kernel), 1e-30))


def prune_layer_hessian(method: PosttrainMethod, kernel: jax.Array, hessian: jax.Array | None,
                        pattern: str | Pattern = "unstructured", sparsity: float | None = None,
                        **options: Any) -> PrunedLayer:
    """:func:`prune_layer` from ``H = X^T X`` instead of the inputs (magnitude ignores it).

    >>> import jax.numpy as jnp
    >>> prune_layer_hessian("wanda", jnp.array([[1.0], [2.0]]), jnp.diag(jnp.array([9.0, 1.0])),
    ...                     sparsity=0.5).mask
    Array([[ True],
           [False]], dtype=bool)
    """
    return _prune(method, True, kernel, hessian, pattern, sparsity, options)


def _magnitude(kernel: jax.Array, data: Any, pattern: str | Pattern, sparsity: float | None,
               **options: Any) -> PrunedLayer:
    del data  # data-free
    if options:
        raise ValueError(f"magnitude pruning takes no options, got {sorted(options)}")
    return magnitude_prune(kernel, pattern, sparsity)


register_posttrain_method("magnitude", PosttrainPruner(_magnitude, _magnitude))
register_posttrain_method("wanda", PosttrainPruner(wanda_prune, wanda_prune_hessian))
register_posttrain_method("sparsegpt", PosttrainPruner(sparsegpt_prune, sparsegpt_prune_hessian,
                                                       check_pattern=_sparsegpt_pattern))
