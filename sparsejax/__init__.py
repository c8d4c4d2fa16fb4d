"""sparsejax: sparse neural network training in JAX.

Masks and scores are pytrees beside the params; every method is a NamedTuple of pure,
jit-able functions (see :class:`sparsejax.Method`).

>>> import jax.numpy as jnp, sparsejax
>>> sparsejax.topk_mask(jnp.array([0.3, 0.1, 0.7, 0.5]), density=0.5)
Array([False, False,  True,  True], dtype=bool)
"""

from sparsejax.distributions import (
    DISTRIBUTIONS,
    erdos_renyi_raw_density,
    erk_raw_density,
    layer_densities,
    select_masks,
)
from sparsejax.masks import (
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
from sparsejax.methods import (
    METHODS,
    Method,
    SparseState,
    dense,
    fixed_mask,
    get_method,
    register_method,
    static,
    step_key,
)
from sparsejax.schedules import (
    constant,
    cosine_drop_fraction,
    cubic_sparsity,
    is_update_step,
    one_shot,
)
from sparsejax.ste import ste_mask, supermask
from sparsejax.topk import kth_largest, num_kept, topk_mask
from sparsejax.training import LossFn, make_train_step, stateless_loss
from sparsejax.transforms import keep_pruned_zero, mask_gradients, zero_masked
from sparsejax.validation import check_density, check_same_structure, check_sparsity

__version__ = "0.1.0"

__all__ = [
    "DISTRIBUTIONS",
    "METHODS",
    "LayerSparsity",
    "Method",
    "Prunable",
    "SparseState",
    "apply_masks",
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
    "erdos_renyi_raw_density",
    "erk_raw_density",
    "fixed_mask",
    "format_sparsity_report",
    "get_method",
    "is_update_step",
    "keep_pruned_zero",
    "LossFn",
    "make_train_step",
    "stateless_loss",
    "kth_largest",
    "layer_densities",
    "leaf_densities",
    "mask_gradients",
    "num_kept",
    "one_shot",
    "overall_density",
    "prunable_except",
    "prunable_leaves",
    "register_method",
    "select_masks",
    "sparsity_report",
    "static",
    "ste_mask",
    "step_key",
    "supermask",
    "topk_mask",
    "zero_masked",
]
