"""Sparse export: BCOO and packed N:M kernels, and a model's forward from them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify, sparse

from sparsejax.core.masks import apply_masks, count_kept, prunable_leaves
from sparsejax.core.patterns import pattern_mask
from sparsejax.core.topk import topk_mask
from sparsejax.harness.models import GPT, LeNet300
from sparsejax.io.export import (
    NMPacked,
    export_state,
    nm_matmul,
    nm_pack,
    nm_unpack,
    sparse_apply,
    sparse_params,
    to_bcoo,
)
from sparsejax.methods import static

SETTINGS = settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def masked_kernel(shape, pattern, seed, density=None):
    kernel = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    mask = pattern_mask(np.abs(kernel), pattern, density)
    return jnp.where(mask, kernel, 0.0), mask


def test_bcoo_holds_exactly_the_kept_entries():
    kernel = jax.random.normal(jax.random.key(0), (12, 7))
    mask = topk_mask(jax.random.uniform(jax.random.key(1), (12, 7)), 0.3)
    kernel = kernel.at[0, 0].set(0.0)
    mask = mask.at[0, 0].set(True)  # a kept weight that is exactly zero stays stored
    b = to_bcoo(kernel, mask)
    assert b.nse == int(mask.sum()) == 26  # 0.3 of 84 = 25, and the zero
    dense = np.asarray(b.todense())
    np.testing.assert_array_equal(dense.view(np.uint32),
                                  np.asarray(jnp.where(mask, kernel, 0.0)).view(np.uint32))
    np.testing.assert_array_equal(np.asarray(b.indices), np.argwhere(np.asarray(mask)))
    assert to_bcoo(jnp.where(mask, kernel, 0.0)).nse == 25  # default: the non-zeros


@st.composite
def nm_cases(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m))
    groups = draw(st.sampled_from([1, 3]))
    out = draw(st.sampled_from([1, 3]))
    axis = draw(st.sampled_from([-2, -1, 0]))
    shape = (m * groups, out) if axis != -1 else (out, m * groups)
    return shape, f"{n}:{m}@{axis}", draw(st.integers(0, 2**16))


def numpy_nm_mask(shape, n, m, axis, rng):
    """A random mask with at most ``n`` kept of every ``m`` along ``axis`` (numpy)."""
    moved = np.moveaxis(np.zeros(shape, bool), axis, -1)
    groups = moved.reshape(-1, m)
    rank = np.argsort(rng.random(groups.shape), axis=1)
    keep = (rank < rng.integers(0, n + 1, (groups.shape[0], 1)))  # 0..n per group
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@SETTINGS
@given(nm_cases())
def test_nm_pack_round_trips_bitwise(case):
    shape, pattern, seed = case
    n, m = (int(v) for v in pattern.split("@")[0].split(":"))
    axis = int(pattern.split("@")[1])
    rng = np.random.default_rng(seed)
    mask = numpy_nm_mask(shape, n, m, axis, rng)
    kernel = np.where(mask, rng.normal(size=shape), 0.0).astype(np.float32)
    packed = nm_pack(kernel, pattern)
    expected = list(shape)
    expected[axis] = shape[axis] * n // m
    assert packed.values.shape == packed.positions.shape == tuple(expected)
    assert packed.positions.dtype == jnp.uint8
    assert int(packed.positions.max()) < m
    assert np.count_nonzero(packed.values) == mask.sum()
    np.testing.assert_array_equal(np.asarray(nm_unpack(packed)).view(np.uint32),
                                  kernel.view(np.uint32))
    # packing by the mask keeps its positions, whatever the kernel holds outside it
    noisy = np.where(mask, kernel, 7.0).astype(np.float32)
    with_mask = nm_pack(noisy, pattern, mask)
    np.testing.assert_array_equal(np.asarray(nm_unpack(with_mask)).view(np.uint32),
                                  kernel.view(np.uint32))


def test_nm_pack_layout_by_hand():
    # (in=8, out=1) in 2:4: groups [0, a, 0, b] and [c, 0, 0, 0]
    kernel = jnp.array([0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0])[:, None]
    packed = nm_pack(kernel, "2:4")
    np.testing.assert_array_equal(packed.positions[:, 0], [1, 3, 0, 1])
    np.testing.assert_array_equal(packed.values[:, 0], [1.5, -2.0, 3.0, 0.0])
    # a mask that keeps a zero weight stores it in place of the default top-up
    mask = jnp.array([False, True, False, True, False, False, True, True])[:, None]
    kept = nm_pack(kernel, "2:4", mask)
    np.testing.assert_array_equal(kept.positions[:, 0], [1, 3, 2, 3])
    np.testing.assert_array_equal(nm_unpack(kept), jnp.where(mask, kernel, 0.0))


@pytest.mark.parametrize("pattern,product", [("2:4", "gather"), ("1:4", "gather"),
                                             ("4:8", "gather"), ("2:4", "unpack")])
def test_nm_matmul_equals_the_dense_product(pattern, product):
    kernel, _ = masked_kernel((16, 6), pattern, 3)
    x = jax.random.normal(jax.random.key(4), (2, 5, 16))
    packed = nm_pack(kernel, pattern)
    out = nm_matmul(x, packed, product=product)
    np.testing.assert_allclose(out, x @ kernel, rtol=1e-5, atol=1e-5)
    # a one-hot input picks one input row of the kernel exactly
    np.testing.assert_array_equal(nm_matmul(jnp.eye(16), packed, product=product), kernel)


def test_nm_pack_works_under_jit():
    kernel, _ = masked_kernel((8, 3), "2:4", 5)
    packed = jax.jit(nm_pack, static_argnames="pattern")(kernel, pattern="2:4")
    np.testing.assert_array_equal(nm_unpack(packed), kernel)


def test_errors_name_the_problem():
    overfull = jnp.ones((8, 2)).at[4:, 1].set(0.0)  # column 0: 4 of 4 kept twice
    with pytest.raises(ValueError,
                       match=r"fc1/kernel: 3 groups of 4 .* keep more than 2 entries \(up to 4\)"):
        nm_pack(overfull, "2:4", where="fc1/kernel")
    with pytest.raises(ValueError, match="not divisible by 4"):
        nm_pack(jnp.zeros((6, 2)), "2:4")
    with pytest.raises(ValueError, match="needs an N:M pattern"):
        nm_pack(jnp.zeros((8, 2)), "unstructured")
    with pytest.raises(ValueError, match="mask shape"):
        to_bcoo(jnp.zeros((4, 2)), jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="Dense kernel"):
        to_bcoo(jnp.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(to_bcoo)(jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="input axis"):
        nm_matmul(jnp.ones((1, 2)), nm_pack(jnp.zeros((2, 8)), "2:4@-1"))
    with pytest.raises(ValueError, match="product must be one of"):
        nm_matmul(jnp.ones((1, 4)), nm_pack(jnp.zeros((4, 2)), "2:4"), product="dense")
    with pytest.raises(ValueError, match="nm_product must be one of"):
        sparse_apply(LeNet300(num_classes=2), {"params": {}}, jnp.ones((1, 4)),
                     nm_product="dense")
    with pytest.raises(ValueError, match="form must be"):
        sparse_params({"k": jnp.zeros((4, 4))}, form="block:2")
    bad = {"fc": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match="fc/kernel: 2 groups of 4"):
        sparse_params(bad, form="2:4")
    # under jit the check is a checkify check the caller opts into
    error, _ = checkify.checkify(jax.jit(nm_pack, static_argnames="pattern"))(
        jnp.ones((4, 1)), pattern="2:4")
    assert "kernel: a group of 4 along axis -2 keeps more than 2" in error.get()


@pytest.fixture(scope="module")
def lenet():
    model = LeNet300(num_classes=10, hidden=(24, 16))
    params = model.init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
    return model, params, jax.random.normal(jax.random.key(1), (6, 32))


@pytest.fixture(scope="module")
def gpt():
    model = GPT(num_classes=17, n_layer=2, n_embd=16, n_head=2, context=8)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = jax.random.randint(jax.random.key(1), (3, 8), 0, 17)
    return model, params, tokens


def pattern_masks(params, pattern, density=None):
    """Masks of every prunable leaf: a 2:4 magnitude mask, or a random one that keeps
    about ``density`` (numpy: no top-k to compile)."""
    rng = np.random.default_rng(0)

    def mask(p, prunable):
        if not prunable:
            return jnp.ones(p.shape, bool)
        if pattern == "unstructured":
            return jnp.asarray(rng.random(p.shape) < density)
        return nm_masks(p, pattern)

    return jax.tree_util.tree_map(mask, params, prunable_leaves(params))


@functools.partial(jax.jit, static_argnames="pattern")
def nm_masks(kernel, pattern):
    return pattern_mask(jnp.abs(kernel), pattern)


@pytest.mark.parametrize("name", ["lenet", "gpt"])
@pytest.mark.parametrize("form,pattern,density,product", [
    ("bcoo", "unstructured", 0.2, "gather"), ("2:4", "2:4", None, "gather"),
    ("2:4", "2:4", None, "unpack")])
def test_sparse_forward_equals_the_dense_masked_forward(request, name, form, pattern,
                                                        density, product):
    model, params, x = request.getfixturevalue(name)
    masks = pattern_masks(params, pattern, density)
    exported = sparse_params(params, masks, form)
    kernels = [leaf for leaf in jax.tree_util.tree_leaves(
        exported, is_leaf=lambda v: isinstance(v, (NMPacked, sparse.BCOO)))
        if isinstance(leaf, (NMPacked, sparse.BCOO))]
    assert len(kernels) == (3 if name == "lenet" else 13)  # every Dense kernel
    if form == "bcoo":
        assert sum(k.nse for k in kernels) == int(count_kept(masks, prunable_leaves(params)))
    dense_out = jax.jit(model.apply)({"params": apply_masks(params, masks)}, x)
    sparse_out = jax.jit(lambda v, x: sparse_apply(model, v, x, nm_product=product))(
        {"params": exported}, x)
    np.testing.assert_allclose(sparse_out, dense_out, rtol=1e-5, atol=1e-5)


def test_export_state_stores_a_methods_effective_weights():
    params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)),
                     "bias": jnp.ones(4)}}
    method = static(optax.sgd(0.1), sparsity=0.75)
    state = method.init(params, jax.random.key(1))
    exported = sparse_params(jax.device_get(method.effective_params(state)),
                             jax.device_get(state.masks))
    via_state = export_state(method, state)
    assert via_state["fc"]["kernel"].nse == int(state.masks["fc"]["kernel"].sum()) == 8
    np.testing.assert_array_equal(via_state["fc"]["kernel"].todense(),
                                  exported["fc"]["kernel"].todense())
    np.testing.assert_array_equal(via_state["fc"]["kernel"].todense(),
                                  method.effective_params(state)["fc"]["kernel"])
    np.testing.assert_array_equal(via_state["fc"]["bias"], params["fc"]["bias"])
