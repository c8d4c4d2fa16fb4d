"""Tests for sparsejax.harness.models: shapes, parameter counts, options, batch-norm state,
errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.harness.models import (
    MODEL_NAMES,
    PARAM_LEAF_NAMES,
    STATE_LEAF_NAMES,
    TEXT_MODELS,
    apply_model,
    get_model,
    init_model,
    model_options,
)

CLASSES = 10
BATCH = 2
CIFAR = (BATCH, 32, 32, 3)
MNIST = (BATCH, 28, 28, 1)
TOKENS = (BATCH, 16)  # gpt: token ids (batch, time); CLASSES is its vocabulary
INPUT_SHAPES = {name: CIFAR for name in MODEL_NAMES} | {"lenet300": MNIST, "vit_small": MNIST,
                                                        **dict.fromkeys(TEXT_MODELS, TOKENS)}
BN_MODELS = ("resnet18", "resnet20", "wrn22_2")

jit_apply = jax.jit(apply_model, static_argnums=0, static_argnames="train")


@functools.cache
def initialised(name: str):
    """(model, params, state) with default options; each model is initialised once.

    An ``rbg`` key makes eager init about 2x faster on CPU (threefry compiles one program per
    kernel shape); the default threefry key is exercised by the gradient test and doctests.
    """
    model = get_model(name, CLASSES)
    params, state = init_model(model, jax.random.key(0, impl="rbg"), INPUT_SHAPES[name])
    return model, params, state


def abstract_variables(name: str, input_shape: tuple[int, ...] = CIFAR, **options):
    """Shapes of all variables of a model, without computing anything."""
    model = get_model(name, CLASSES, **options)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False)
    )


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def leaves_by_name(tree) -> list[tuple[str, object]]:
    """(path, leaf) for every leaf, path joined with '/'."""
    return [
        ("/".join(str(k.key) for k in path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def modules(tree, prefix: str = ""):
    """Yield (path, dict) for every dict of leaves (one per layer) in a variables tree."""
    if all(not isinstance(v, dict) for v in tree.values()):
        yield prefix, tree
        return
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from modules(value, f"{prefix}/{key}" if prefix else key)


def images(shape: tuple[int, ...], seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


# --- forward pass ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_under_jit_gives_finite_logits(name):
    model, params, state = initialised(name)
    x = images(INPUT_SHAPES[name])
    if name in TEXT_MODELS:
        x = jax.random.randint(jax.random.key(1), TOKENS, 0, CLASSES)
    logits, new_state = jit_apply(model, params, state, x, train=False)
    assert logits.shape == ((*TOKENS, CLASSES) if name in TEXT_MODELS else (BATCH, CLASSES))
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    # no None leaves anywhere in the state
    assert all(leaf is not None for leaf in jax.tree.leaves(state, is_leaf=lambda v: v is None))


def test_lenet_flattens_its_input():
    model, params, state = initialised("lenet300")
    x = images(MNIST)
    as_images, _ = apply_model(model, params, state, x, train=False)
    flat, _ = apply_model(model, params, state, x.reshape(BATCH, 784), train=False)
    np.testing.assert_allclose(as_images, flat, rtol=1e-6)


def test_gradients_wrt_params_under_jit():
    # conv2 with batch norm: shares its kernel shapes (and cached init code) with plain conv2
    model = get_model("conv2", CLASSES, norm="batch")
    params, state = init_model(model, jax.random.key(0), CIFAR)
    x, y = images(CIFAR), jnp.array([1, 7])

    @jax.jit
    def loss_fn(params, state):
        logits, new_state = apply_model(model, params, state, x, train=True)
        loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(BATCH), y])
        return loss, new_state

    grads, new_state = jax.grad(loss_fn, has_aux=True)(params, state)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for layer in ("conv1", "conv2", "fc1", "fc2", "head"):
        assert float(jnp.abs(grads[layer]["kernel"]).sum()) > 0, layer
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert not np.allclose(new_state["batch_stats"]["bn1"]["mean"], 0.0)


# --- parameter counts --------------------------------------------------------------------


def conv(k: int, c_in: int, c_out: int) -> int:
    """Parameters of a k x k conv with bias."""
    return k * k * c_in * c_out + c_out


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv_net_count(pairs: int, side: int, c_in: int) -> int:
    """Hand count of Conv-(2 * pairs) with bias: conv pairs, then FC 256, 256, 10."""
    channels = (64, 128, 256, 512)[:pairs]
    total, previous = 0, c_in
    for c in channels:
        total += conv(3, previous, c) + conv(3, c, c)
        previous = c
        side //= 2  # 2x2 max-pool after each pair
    return total + dense(side * side * previous, 256) + dense(256, 256) + dense(256, 10)


def test_lenet300_count():
    _, params, _ = initialised("lenet300")
    assert count(params) == 266_610
    assert count(params) == (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)


def test_conv_net_counts_cifar():
    expected = {
        # conv 3->64, 64->64; pool to 16x16x64; FC 16384-256-256-10
        "conv2": (3 * 3 * 3 * 64 + 64)
        + (3 * 3 * 64 * 64 + 64)
        + (16 * 16 * 64 * 256 + 256)
        + (256 * 256 + 256)
        + (256 * 10 + 10),
        # + conv 64->128, 128->128; pool to 8x8x128; FC 8192-256-256-10
        "conv4": (3 * 3 * 3 * 64 + 64)
        + (3 * 3 * 64 * 64 + 64)
        + (3 * 3 * 64 * 128 + 128)
        + (3 * 3 * 128 * 128 + 128)
        + (8 * 8 * 128 * 256 + 256)
        + (256 * 256 + 256)
        + (256 * 10 + 10),
        # + conv 128->256, 256->256; pool to 4x4x256; FC 4096-256-256-10
        "conv6": (3 * 3 * 3 * 64 + 64)
        + (3 * 3 * 64 * 64 + 64)
        + (3 * 3 * 64 * 128 + 128)
        + (3 * 3 * 128 * 128 + 128)
        + (3 * 3 * 128 * 256 + 256)
        + (3 * 3 * 256 * 256 + 256)
        + (4 * 4 * 256 * 256 + 256)
        + (256 * 256 + 256)
        + (256 * 10 + 10),
        # + conv 256->512, 512->512; pool to 2x2x512; FC 2048-256-256-10
        "conv8": (3 * 3 * 3 * 64 + 64)
        + (3 * 3 * 64 * 64 + 64)
        + (3 * 3 * 64 * 128 + 128)
        + (3 * 3 * 128 * 128 + 128)
        + (3 * 3 * 128 * 256 + 256)
        + (3 * 3 * 256 * 256 + 256)
        + (3 * 3 * 256 * 512 + 512)
        + (3 * 3 * 512 * 512 + 512)
        + (2 * 2 * 512 * 256 + 256)
        + (256 * 256 + 256)
        + (256 * 10 + 10),
    }
    assert expected == {
        "conv2": 4_301_642,
        "conv4": 2_425_930,
        "conv6": 2_262_602,
        "conv8": 5_278_282,
    }
    for name, n in expected.items():
        _, params, _ = initialised(name)
        assert count(params) == n, name
        assert conv_net_count(int(name[-1]) // 2, 32, 3) == n


def test_conv_net_counts_mnist():
    for pairs in (1, 2, 3, 4):
        variables = abstract_variables(f"conv{2 * pairs}", (1, 28, 28, 1))
        assert count(variables["params"]) == conv_net_count(pairs, 28, 1)
    # Conv-2 on MNIST: the FC layer sees 14 * 14 * 64 features
    assert conv_net_count(1, 28, 1) == 3_317_450


def test_resnet_and_vit_counts():
    # ResNet-18 (CIFAR) 11.17M and ResNet-20 0.27M (with 1x1 projection shortcuts), as
    # published; WRN-22-2 about 1.1M; convs before batch norm carry no bias.
    expected = {"resnet18": 11_173_962, "resnet20": 272_474, "wrn22_2": 1_079_642}
    for name, n in expected.items():
        _, params, _ = initialised(name)
        assert count(params) == n, name
    # ResNet-20 by hand: stem, 3 stages of 3 blocks, projections at stages 2 and 3, head.
    bn = lambda c: 2 * c  # noqa: E731
    stem = 3 * 3 * 3 * 16 + bn(16)
    stage1 = 6 * (3 * 3 * 16 * 16 + bn(16))
    stage2 = 3 * 3 * 16 * 32 + 5 * 3 * 3 * 32 * 32 + 6 * bn(32) + 16 * 32 + bn(32)
    stage3 = 3 * 3 * 32 * 64 + 5 * 3 * 3 * 64 * 64 + 6 * bn(64) + 32 * 64 + bn(64)
    assert stem + stage1 + stage2 + stage3 + dense(64, 10) == 272_474
    # ViT on MNIST: 7 * 7 patches + class token, dim 128, 6 blocks, MLP 256.
    d, tokens = 128, 7 * 7 + 1
    block = 2 * 2 * d + 4 * dense(d, d) + dense(d, 2 * d) + dense(2 * d, d)
    vit = conv(4, 1, d) + d + tokens * d + 6 * block + 2 * d + dense(d, 10)
    _, params, _ = initialised("vit_small")
    assert count(params) == vit


# --- options -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_use_bias_false_leaves_bias_only_in_norms(name):
    variables = abstract_variables(name, INPUT_SHAPES[name], use_bias=False)
    n_bias = 0
    for path, layer in modules(variables["params"]):
        if "bias" in layer:
            n_bias += 1
            # only norms (scale + bias, no kernel) keep a bias
            assert "kernel" not in layer and "scale" in layer, path
    if name.startswith(("lenet", "conv")):
        assert n_bias == 0


@pytest.mark.parametrize("name", ["conv4", *BN_MODELS])
def test_norm_affine_false_gives_batch_norm_without_params(name):
    options = {"norm": "batch"} if name == "conv4" else {}
    affine = abstract_variables(name, **options)
    plain = abstract_variables(name, norm_affine=False, use_bias=False, **options)
    # Edge-Popup style: only kernels are params; every norm still has running statistics
    assert {path.rsplit("/", 1)[1] for path, _ in leaves_by_name(plain["params"])} == {"kernel"}
    assert jax.tree.structure(plain["batch_stats"]) == jax.tree.structure(affine["batch_stats"])
    n_norms = len(list(modules(affine["batch_stats"])))
    assert n_norms > 0
    assert all(set(layer) == {"mean", "var"} for _, layer in modules(plain["batch_stats"]))
    n_affine_params = sum(1 for _, layer in modules(affine["params"]) if "scale" in layer)
    assert n_affine_params == n_norms


@pytest.mark.parametrize("name", ["conv2", "resnet20", "wrn22_2"])
def test_norm_none_has_no_batch_stats(name):
    variables = abstract_variables(name, norm="none")
    assert set(variables) == {"params"}
    # without batch norm the convolutions carry biases
    assert all("bias" in layer for _, layer in modules(variables["params"]))


def test_conv_nets_default_to_no_norm_and_resnets_to_batch_norm():
    for name in ("conv2", "conv4", "conv6", "conv8"):
        assert initialised(name)[2] == {}
    for name in BN_MODELS:
        assert set(initialised(name)[2]) == {"batch_stats"}


def test_width_multiplier():
    variables = abstract_variables("conv2", width=0.5)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 32)
    assert variables["params"]["fc1"]["kernel"].shape == (16 * 16 * 32, 128)
    variables = abstract_variables("resnet20", width=2.0)
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    variables = abstract_variables("lenet300", MNIST, width=0.5)
    assert variables["params"]["fc1"]["kernel"].shape == (784, 150)


def test_mlp_hidden_option():
    # default: the MNIST-1D lottery MLP 40-500-500-10
    params = abstract_variables("mlp", (BATCH, 40, 1))["params"]
    shapes = {k: (v["kernel"].shape, v["bias"].shape) for k, v in params.items()}
    assert shapes == {"fc1": ((40, 500), (500,)), "fc2": ((500, 500), (500,)),
                      "head": ((500, 10), (10,))}
    assert count(params) == 276_010
    # any depth; a JSON list (sparsejax train --model-option hidden=[64,32,16]) works too
    model = get_model("mlp", CLASSES, hidden=[64, 32, 16])
    assert model.hidden == (64, 32, 16)
    params = abstract_variables("mlp", (BATCH, 40, 1), hidden=[64, 32, 16])["params"]
    assert [params[k]["kernel"].shape for k in ("fc1", "fc2", "fc3", "head")] == [
        (40, 64), (64, 32), (32, 16), (16, 10)]
    with pytest.raises(ValueError, match="hidden"):
        get_model("mlp", CLASSES, hidden=(500, 0))
    # lenet300 is unchanged: same options, and the mlp with its widths gives its params bitwise
    assert model_options("lenet300") == ("use_bias", "width", "kernel_init")
    with pytest.raises(TypeError, match="'hidden'"):
        get_model("lenet300", CLASSES, hidden=(500, 500))
    _, lenet, _ = initialised("lenet300")
    mlp, _ = init_model(get_model("mlp", CLASSES, hidden=(300, 100)),
                        jax.random.key(0, impl="rbg"), MNIST)
    assert jax.tree.structure(mlp) == jax.tree.structure(lenet)
    for a, b in zip(jax.tree.leaves(mlp), jax.tree.leaves(lenet), strict=True):
        np.testing.assert_array_equal(a, b)


def test_vit_options_and_plain_attention_kernels():
    _, params, _ = initialised("vit_small")
    attn = params["block1"]["attn"]
    assert {k: attn[k]["kernel"].shape for k in attn} == {
        k: (128, 128) for k in ("query", "key", "value", "out")
    }
    variables = abstract_variables("vit_small", pool="mean", embed_dim=64, num_heads=8, depth=2)
    assert "cls_token" not in variables["params"]
    assert variables["params"]["pos_embedding"].shape == (1, 64, 64)
    assert "block3" not in variables["params"]


# --- batch-norm state --------------------------------------------------------------------


@pytest.mark.parametrize("name", BN_MODELS)
def test_batch_stats_update_only_in_training(name):
    model, params, state = initialised(name)
    x = images(CIFAR)
    _, trained = jit_apply(model, params, state, x, train=True)
    assert jax.tree.structure(trained) == jax.tree.structure(state)
    for (path, old), (_, new) in zip(leaves_by_name(state), leaves_by_name(trained), strict=True):
        assert old.shape == new.shape
        assert not np.allclose(old, new), path
    _, evaluated = jit_apply(model, params, state, x, train=False)
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(evaluated), strict=True):
        np.testing.assert_array_equal(old, new)


def test_eval_mode_uses_running_statistics():
    model, params, state = initialised("resnet20")
    x = images(CIFAR)
    other = x.at[1].set(images(CIFAR[1:], seed=5))
    a, _ = jit_apply(model, params, state, x, train=False)
    b, _ = jit_apply(model, params, state, other, train=False)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)  # examples independent


# --- leaf names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_leaf_names_and_kernel_ranks(name):
    _, params, state = initialised(name)
    for path, leaf in leaves_by_name(params):
        leaf_name = path.rsplit("/", 1)[-1]
        assert leaf_name in PARAM_LEAF_NAMES, path
        if leaf_name == "kernel":
            assert leaf.ndim >= 2, path
    assert set(state) <= {"batch_stats"}
    for path, _ in leaves_by_name(state):
        assert path.rsplit("/", 1)[-1] in STATE_LEAF_NAMES, path
    assert "head" in params and params["head"]["kernel"].shape[-1] == CLASSES


# --- errors ------------------------------------------------------------------------------


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*lenet300.*vit_small"):
        get_model("resnet50", CLASSES)


def test_unknown_option():
    with pytest.raises(TypeError, match="'dropout'"):
        get_model("resnet18", CLASSES, dropout=0.1)
    with pytest.raises(TypeError, match="'norm'"):
        get_model("lenet300", CLASSES, norm="batch")
    assert model_options("vit_small")[0] == "use_bias"


def test_bad_option_values():
    with pytest.raises(ValueError, match="norm"):
        get_model("resnet20", CLASSES, norm="layer")
    with pytest.raises(TypeError, match="use_bias"):
        get_model("conv2", CLASSES, use_bias="no")
    with pytest.raises(ValueError, match="width"):
        get_model("conv2", CLASSES, width=0)
    with pytest.raises(ValueError, match="num_heads"):
        get_model("vit_small", CLASSES, embed_dim=100, num_heads=8)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("conv2", 0)


def test_bad_inputs():
    model = get_model("conv2", CLASSES)
    with pytest.raises(ValueError, match="NHWC"):
        init_model(model, jax.random.key(0), (BATCH, 784))
    with pytest.raises(ValueError, match="input_shape"):
        init_model(model, jax.random.key(0), (BATCH, 32, 0, 3))
    with pytest.raises(ValueError, match="patch_size"):
        jax.eval_shape(
            lambda: get_model("vit_small", CLASSES).init(
                jax.random.key(0), jnp.zeros((1, 30, 30, 3))
            )
        )
