"""Post-training pruning of a trained model: magnitude, Wanda and SparseGPT per layer
(:mod:`~sparsejax.posttrain.pruners`, :mod:`~sparsejax.posttrain.sparsegpt`), the
calibration inputs of each layer (:mod:`~sparsejax.posttrain.capture`), every linear map
(Dense, einsum) as the matrix the pruners take (:mod:`~sparsejax.posttrain.kernels`) and the
layer-by-layer driver (:mod:`~sparsejax.posttrain.sequential`) and the block-by-block
one (:mod:`~sparsejax.posttrain.blocks`); the algorithms by name
(:mod:`~sparsejax.posttrain.registry`), open to new ones."""

from sparsejax.posttrain.blocks import prune_blocks
from sparsejax.posttrain.capture import capture_dense_inputs, capture_linear_inputs
from sparsejax.posttrain.kernels import KernelLayout
from sparsejax.posttrain.pruners import (
    POSTTRAIN_METHODS,
    PrunedLayer,
    input_hessian,
    magnitude_prune,
    prune_layer,
    reconstruction_error,
    sparsegpt_prune,
    wanda_prune,
    wanda_scores,
)
from sparsejax.posttrain.registry import PosttrainPruner, register_posttrain_method
from sparsejax.posttrain.sequential import LayerReport, prune_mlp_sequential, prune_sequential

__all__ = [
    "KernelLayout",
    "POSTTRAIN_METHODS",
    "LayerReport",
    "PosttrainPruner",
    "PrunedLayer",
    "capture_dense_inputs",
    "capture_linear_inputs",
    "input_hessian",
    "magnitude_prune",
    "prune_blocks",
    "prune_layer",
    "prune_mlp_sequential",
    "prune_sequential",
    "reconstruction_error",
    "register_posttrain_method",
    "sparsegpt_prune",
    "wanda_prune",
    "wanda_scores",
]
