import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import (
    apply_masks,
    count_kept,
    default_prunable,
    dense_masks,
    leaf_densities,
    overall_density,
    prunable_leaves,
    sparsity_report,
)


def params():
    return {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
            "Conv_0": {"kernel": jnp.ones((3, 3, 2, 2))}}


def test_dense_masks_are_bool_and_match_structure_without_none():
    masks = dense_masks(params())
    leaves = jax.tree_util.tree_leaves(masks, is_leaf=lambda x: x is None)
    assert all(m is not None for m in leaves)
    chex.assert_trees_all_equal_shapes(masks, params())  # and the same structure
    chex.assert_type(leaves, bool)


def test_prunable_default_is_kernels_with_ndim_2_or_more():
    assert prunable_leaves(params()) == {
        "Dense_0": {"kernel": True, "bias": False}, "Conv_0": {"kernel": True}}
    assert not default_prunable("BatchNorm_0/scale", jnp.ones((3, 3)))


def test_apply_count_and_densities():
    masks = dense_masks(params())
    masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].at[0].set(False)
    masked = jax.jit(apply_masks)(params(), masks)
    expected = params()
    expected["Dense_0"]["kernel"] = expected["Dense_0"]["kernel"].at[0].set(0.0)
    chex.assert_trees_all_equal(masked, expected, strict=True)  # values, dtypes, shapes
    assert int(count_kept(masks)) == 12 + 3 + 36 - 3
    assert float(leaf_densities(masks)["Dense_0"]["kernel"]) == 0.75
    prunable = prunable_leaves(params())
    assert float(overall_density(masks, prunable)) == (9 + 36) / 48


def test_apply_masks_rejects_mismatched_trees():
    masks = dense_masks(params())
    with pytest.raises(ValueError, match="missing leaves"):
        apply_masks(params(), {"Dense_0": masks["Dense_0"]})
    masks["Conv_0"]["kernel"] = jnp.ones((3, 3, 2, 1), bool)
    with pytest.raises(ValueError, match="'Conv_0/kernel' has shape"):
        apply_masks(params(), masks)


def test_sparsity_report_measures_effective_zeros():
    p = params()
    masks = dense_masks(p)
    masks["Dense_0"]["kernel"] = jnp.zeros((4, 3), bool)
    rows = sparsity_report(p, masks)
    by_path = {r.path: r for r in rows}
    assert by_path["Dense_0/kernel"].kept == 0
    assert by_path["Dense_0/bias"].prunable is False
    total = by_path["total (prunable)"]
    assert (total.size, total.kept) == (48, 36)
    assert np.isclose(total.sparsity, 0.25)
    table = sparsejax.format_sparsity_report(rows)
    assert "Conv_0/kernel" in table and "3x3x2x2" in table
