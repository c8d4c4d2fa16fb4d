"""sparsejax: sparse neural network training in JAX.

Masks and scores are pytrees beside the params; every method is a NamedTuple of pure,
jit-able functions (see :class:`sparsejax.Method`).

>>> import jax.numpy as jnp, sparsejax
>>> sparsejax.topk_mask(jnp.array([0.3, 0.1, 0.7, 0.5]), density=0.5)
Array([False, False,  True,  True], dtype=bool)
"""

import importlib
from typing import Any

from sparsejax.core.distributions import (
    DISTRIBUTIONS,
    KeptCounts,
    erdos_renyi_raw_density,
    erk_raw_density,
    kept_counts,
    layer_densities,
    select_masks,
)
from sparsejax.core.masks import (
    LayerSparsity,
    Prunable,
    apply_masks,
    count_kept,
    count_total,
    default_prunable,
    dense_masks,
    format_sparsity_report,
    leaf_densities,
    overall_density,
    prunable_except,
    prunable_leaves,
    sparsity_report,
)
from sparsejax.core.patterns import (
    Pattern,
    as_pattern,
    check_pattern,
    pattern_density,
    pattern_mask,
    per_output_mask,
)
from sparsejax.core.schedules import (
    constant,
    cosine_drop_fraction,
    cubic_sparsity,
    is_update_step,
    one_shot,
)
from sparsejax.core.ste import ste_mask, supermask, supermask_product
from sparsejax.core.topk import kth_largest, num_kept, topk_mask, topk_mask_tracked
from sparsejax.core.transforms import keep_pruned_zero, mask_gradients, zero_masked
from sparsejax.core.validation import check_density, check_same_structure, check_sparsity
from sparsejax.engine import LossFn, make_train_step, stateless_loss
from sparsejax.integrations.optax_form import (
    SparseTxState,
    as_optax,
    forward_params,
    masks_of,
    replace_masks,
    sparse_tx,
    zero_pruned,
)
from sparsejax.io.export import (
    NMPacked,
    export_state,
    nm_matmul,
    nm_pack,
    nm_unpack,
    sparse_apply,
    sparse_matmul,
    sparse_params,
    to_bcoo,
)
from sparsejax.methods import (
    METHODS,
    InitContext,
    MaskPhases,
    Method,
    SparseState,
    dense,
    fixed_mask,
    get_method,
    register_method,
    static,
    step_key,
)
from sparsejax.methods.dst import (
    RegrowRules,
    prune_and_regrow,
    regrow_masks,
    reset_slots,
    rigl,
    snfs,
    sparse_evolutionary,
)
from sparsejax.methods.gates import (
    BINARIZE_RULES,
    GATE_FORMS,
    GateForm,
    gates,
    gaussian_gate,
    hard_concrete_gate,
)
from sparsejax.methods.pruning import (
    gradual_magnitude,
    grasp,
    grasp_scores,
    magnitude,
    magnitude_scores,
    masks_for_densities,
    random_prune,
    scheduled_magnitude,
    snip,
    snip_scores,
    synflow,
    synflow_masks,
    synflow_scores,
)
from sparsejax.methods.ste import (
    sparse_refined_gradients,
    sr_ste,
    ste_magnitude,
    ste_random,
    straight_through,
)
from sparsejax.methods.strong import biprop, edge_popup, score_supermask, supermask_weights
from sparsejax.methods.strong_init import WEIGHT_INITS, init_scores, init_weights
from sparsejax.methods.supermask import binarize, binarized_supermask
from sparsejax.posttrain.blocks import prune_blocks
from sparsejax.posttrain.capture import capture_dense_inputs, capture_linear_inputs
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

__version__ = "0.1.0"

__all__ = [
    # sparse export for inference
    "NMPacked",
    "export_state",
    "nm_matmul",
    "nm_pack",
    "nm_unpack",
    "sparse_apply",
    "sparse_matmul",
    "sparse_params",
    "to_bcoo",
    # sparsity patterns and post-training pruning
    "Pattern",
    "as_pattern",
    "check_pattern",
    "pattern_density",
    "pattern_mask",
    "per_output_mask",
    "POSTTRAIN_METHODS",
    "PosttrainPruner",
    "register_posttrain_method",
    "PrunedLayer",
    "input_hessian",
    "magnitude_prune",
    "prune_layer",
    "reconstruction_error",
    "sparsegpt_prune",
    "wanda_prune",
    "wanda_scores",
    "LayerReport",
    "prune_mlp_sequential",
    "prune_sequential",
    "prune_blocks",
    "capture_dense_inputs",
    "capture_linear_inputs",
    "linen",
    "nnx",
    "InitContext",
    "zero_pruned",
    "forward_params",
    "straight_through",
    "ste_magnitude",
    "ste_random",
    "sr_ste",
    "sparse_refined_gradients",
    "sparse_tx",
    "replace_masks",
    "masks_of",
    "as_optax",
    "SparseTxState",
    "apply_masks",
    "binarize",
    "BINARIZE_RULES",
    "binarized_supermask",
    "biprop",
    "check_density",
    "check_same_structure",
    "check_sparsity",
    "constant",
    "cosine_drop_fraction",
    "count_kept",
    "count_total",
    "cubic_sparsity",
    "default_prunable",
    "dense",
    "dense_masks",
    "DISTRIBUTIONS",
    "edge_popup",
    "erdos_renyi_raw_density",
    "erk_raw_density",
    "fixed_mask",
    "format_sparsity_report",
    "GATE_FORMS",
    "GateForm",
    "gates",
    "gaussian_gate",
    "get_method",
    "gradual_magnitude",
    "grasp",
    "grasp_scores",
    "hard_concrete_gate",
    "init_scores",
    "init_weights",
    "is_update_step",
    "keep_pruned_zero",
    "kth_largest",
    "KeptCounts",
    "kept_counts",
    "layer_densities",
    "LayerSparsity",
    "leaf_densities",
    "LossFn",
    "magnitude",
    "magnitude_scores",
    "make_train_step",
    "mask_gradients",
    "masks_for_densities",
    "MaskPhases",
    "Method",
    "METHODS",
    "num_kept",
    "one_shot",
    "overall_density",
    "Prunable",
    "prunable_except",
    "prunable_leaves",
    "prune_and_regrow",
    "random_prune",
    "register_method",
    "regrow_masks",
    "RegrowRules",
    "reset_slots",
    "rigl",
    "scheduled_magnitude",
    "score_supermask",
    "select_masks",
    "snfs",
    "snip",
    "snip_scores",
    "sparse_evolutionary",
    "SparseState",
    "sparsity_report",
    "stateless_loss",
    "static",
    "ste_mask",
    "step_key",
    "supermask",
    "supermask_product",
    "supermask_weights",
    "synflow",
    "synflow_masks",
    "synflow_scores",
    "topk_mask",
    "topk_mask_tracked",
    "WEIGHT_INITS",
    "zero_masked",
]


# Score methods in a model or loop of the user's own: sparsejax.nnx (Flax NNX) and
# sparsejax.linen (a linen TrainState), imported on first use so that `import sparsejax`
# does not import flax.nnx or flax.linen for a user of neither.
_LAZY_SUBMODULES = ("linen", "nnx")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"sparsejax.{name}")
    raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")
