"""Flax linen models for sparse-training experiments, and a registry to build them.

The models are plain: masks live outside, in a pytree shaped like ``params``. Leaf names:

* ``params``: ``kernel`` (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``; the only leaves a
  masker normally prunes), ``bias``, ``scale`` (batch norm / LayerNorm), and for ``vit_small``
  the embeddings ``cls_token`` ``(1, 1, D)`` and ``pos_embedding`` ``(1, tokens, D)``; for
  ``gpt`` the ``embedding`` tables of ``token_embed`` and ``pos_embed`` (not pruned by the
  default filter);
* ``batch_stats`` (model state, never masked): ``mean`` and ``var`` of each batch norm.

``llama`` and ``vit_nnx`` are NNX modules (:mod:`sparsejax.harness.models.llama`,
:mod:`sparsejax.harness.models.vit_nnx`): ``get_model`` gives an
:class:`~sparsejax.harness.models._nnx.NNXModel` whose ``init``/``apply`` build and call it
through ``nnx.split``/``nnx.merge``, so ``init_model`` and ``apply_model`` (and the whole
training harness) take it as they take a linen model; its ``params`` are its
``nnx.Param`` state as a dict with string keys (``layers/0/self_attn/q_proj/kernel``).

Every model's classifier is the Dense submodule ``head`` (``gpt``'s gives next-token logits
``(batch, time, vocab)``; its ``num_classes`` is the vocabulary size). A convolution
directly followed by batch norm has no bias (the norm cancels it); ``use_bias`` governs all
other layers.

Models (``get_model(name, num_classes, **options)``) and their options:

============  ==========================================================================
lenet300      LeNet-300-100 (flattens its input). ``use_bias``, ``width``, ``kernel_init``
              ("glorot_normal", or "lecun_normal": variance scaling 1, fan_in, truncated)
mlp           MLP, flattens its input; ``hidden`` ((500, 500): MNIST-1D's 40-500-500-10),
              ``use_bias``, ``width``, ``kernel_init``
conv2..conv8  Conv-2/4/6/8 (Frankle & Carbin 2019). ``use_bias``, ``norm`` ("none"),
              ``norm_affine``, ``width``
resnet18      CIFAR ResNet-18. ``use_bias``, ``norm`` ("batch"), ``norm_affine``, ``width``
resnet20      CIFAR ResNet-20 (1x1-conv projection shortcuts). Same options as resnet18
wrn22_2       pre-activation Wide ResNet-22-2. Same options as resnet18
vit_small     small ViT. ``use_bias``, ``patch_size`` (4), ``embed_dim`` (128), ``depth``
              (6), ``num_heads`` (4), ``mlp_ratio`` (2.0), ``pool`` ("cls" or "mean")
vit_nnx       small ViT in Flax NNX (every projection an ``nnx.Linear``; mean pooling; the
              position table ``pos_embed/embedding``). ``use_bias``, ``image_size`` (32),
              ``channels`` (3; MNIST: ``image_size=28, channels=1``), ``patch_size`` (4),
              ``embed_dim`` (64), ``depth`` (4), ``num_heads`` (4), ``mlp_ratio`` (2.0)
gpt           small causal GPT over token ids ``(batch, time)``. ``use_bias``, ``n_layer``
              (4), ``n_embd`` (128), ``n_head`` (4), ``context`` (64: positions learned)
llama         small LLaMA-style decoder in Flax NNX (RMSNorm, RoPE, SwiGLU, grouped-query
              attention). ``use_bias`` (False), ``n_layer`` (4), ``n_embd`` (128),
              ``n_head`` (4), ``n_kv_head`` (2), ``context`` (64), ``mlp_hidden``
              (``8/3 n_embd`` rounded up to 32: 352)
============  ==========================================================================

>>> import jax, jax.numpy as jnp
>>> model = get_model("conv2", 10, use_bias=False)
>>> params, state = init_model(model, jax.random.key(0), (1, 32, 32, 3))
>>> logits, state = apply_model(model, params, state, jnp.zeros((2, 32, 32, 3)), train=False)
>>> logits.shape, state
((2, 10), {})
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.harness.models._layers import KERNEL_INITS, NORM_KINDS
from sparsejax.harness.models._nnx import NNXModel
from sparsejax.harness.models.convnets import ConvNet
from sparsejax.harness.models.gpt import GPT
from sparsejax.harness.models.llama import Llama, check_heads
from sparsejax.harness.models.mlp import MLP, LeNet300
from sparsejax.harness.models.resnets import BasicBlock, PreActBlock, ResNet, WideResNet
from sparsejax.harness.models.vit import POOLS, ViT
from sparsejax.harness.models.vit_nnx import ViTNNX

__all__ = [
    "MODEL_NAMES",
    "TEXT_MODELS",
    "check_model_dataset",
    "PARAM_LEAF_NAMES",
    "STATE_LEAF_NAMES",
    "get_model",
    "init_model",
    "apply_model",
    "model_options",
    "LeNet300",
    "MLP",
    "ConvNet",
    "ResNet",
    "BasicBlock",
    "WideResNet",
    "PreActBlock",
    "ViT",
    "GPT",
    "Llama",
    "ViTNNX",
    "NNXModel",
]

PARAM_LEAF_NAMES: tuple[str, ...] = ("kernel", "bias", "scale", "cls_token", "pos_embedding",
                                     "embedding")
"""Every leaf name that occurs in a model's ``params``."""

STATE_LEAF_NAMES: tuple[str, ...] = ("mean", "var")
"""Every leaf name that occurs in a model's ``batch_stats``."""

_CONV_OPTIONS = ("use_bias", "norm", "norm_affine", "width")



def _llama(num_classes: int, **options: Any) -> NNXModel:
    """The NNX :class:`Llama` with these options, as the harness takes a model."""
    return NNXModel(Llama, (("num_classes", num_classes), *sorted(options.items())))


def _vit_nnx(num_classes: int, **options: Any) -> NNXModel:
    """The NNX :class:`ViTNNX` with these options, as the harness takes a model."""
    return NNXModel(ViTNNX, (("num_classes", num_classes), *sorted(options.items())))


# name -> (module class or NNX model builder, fixed constructor arguments, accepted options)
_REGISTRY: dict[str, tuple[Callable[..., Any], dict[str, Any], tuple[str, ...]]] = {
    "lenet300": (LeNet300, {}, ("use_bias", "width", "kernel_init")),
    "mlp": (MLP, {}, ("use_bias", "width", "hidden", "kernel_init")),
    "conv2": (ConvNet, {"num_pairs": 1}, _CONV_OPTIONS),
    "conv4": (ConvNet, {"num_pairs": 2}, _CONV_OPTIONS),
    "conv6": (ConvNet, {"num_pairs": 3}, _CONV_OPTIONS),
    "conv8": (ConvNet, {"num_pairs": 4}, _CONV_OPTIONS),
    "resnet18": (
        ResNet,
        {"stage_sizes": (2, 2, 2, 2), "stage_widths": (64, 128, 256, 512)},
        _CONV_OPTIONS,
    ),
    "resnet20": (ResNet, {"stage_sizes": (3, 3, 3), "stage_widths": (16, 32, 64)}, _CONV_OPTIONS),
    "wrn22_2": (WideResNet, {"depth": 22, "widen": 2}, _CONV_OPTIONS),
    "vit_small": (
        ViT,
        {},
        ("use_bias", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pool"),
    ),
    "vit_nnx": (
        _vit_nnx,
        {},
        ("use_bias", "image_size", "channels", "patch_size", "embed_dim", "depth", "num_heads",
         "mlp_ratio"),
    ),
    "gpt": (GPT, {}, ("use_bias", "n_layer", "n_embd", "n_head", "context")),
    "llama": (_llama, {}, ("use_bias", "n_layer", "n_embd", "n_head", "n_kv_head", "context",
                           "mlp_hidden")),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`get_model`."""


TEXT_MODELS: tuple[str, ...] = ("gpt", "llama")
"""Models that take token sequences (text datasets); every other model takes images."""


def check_model_dataset(model: str, dataset: str) -> None:
    """Raise ``ValueError`` when ``model`` cannot take ``dataset``'s inputs (an image model
    on text, or a text model on images), naming both, before anything is compiled.

    >>> check_model_dataset("lenet300", "tinyshakespeare")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: model 'lenet300' takes images and dataset 'tinyshakespeare' is text; ...
    """
    from sparsejax.harness.data import TEXT_DATASETS

    text_model, text_data = model in TEXT_MODELS, dataset in TEXT_DATASETS
    if text_model == text_data or model not in _REGISTRY:
        return
    models = ", ".join(TEXT_MODELS)
    if text_data:
        raise ValueError(f"model {model!r} takes images and dataset {dataset!r} is text; "
                         f"models that take text: {models}")
    raise ValueError(f"model {model!r} takes text and dataset {dataset!r} holds images; "
                     f"text datasets: {', '.join(sorted(TEXT_DATASETS))}; image models: "
                     f"{', '.join(m for m in MODEL_NAMES if m not in TEXT_MODELS)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"option {name!r} must be a bool, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"option {name!r} must be a positive int, got {value!r}")


def _check_positive_real(name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"option {name!r} must be a positive finite number, got {value!r}")


def _check_widths(name: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 1 for v in value):
        raise ValueError(f"option {name!r} must be a sequence of positive ints, got {value!r}")


def _check_choice(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"option {name!r} must be one of {choices}, got {value!r}")

    return check


_OPTION_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "use_bias": _check_bool,
    "norm_affine": _check_bool,
    "norm": _check_choice(NORM_KINDS),
    "pool": _check_choice(POOLS),
    "width": _check_positive_real,
    "mlp_ratio": _check_positive_real,
    "patch_size": _check_positive_int,
    "image_size": _check_positive_int,
    "channels": _check_positive_int,
    "embed_dim": _check_positive_int,
    "depth": _check_positive_int,
    "num_heads": _check_positive_int,
    "n_layer": _check_positive_int,
    "n_embd": _check_positive_int,
    "n_head": _check_positive_int,
    "n_kv_head": _check_positive_int,
    "mlp_hidden": _check_positive_int,
    "context": _check_positive_int,
    "hidden": _check_widths,
    "kernel_init": _check_choice(tuple(KERNEL_INITS)),
}


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options that :func:`get_model` accepts for model ``name``.

    >>> model_options("lenet300")
    ('use_bias', 'width', 'kernel_init')
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name][2]


def get_model(name: str, num_classes: int, **options: Any) -> nn.Module | NNXModel:
    """Build the registered model ``name`` with ``num_classes`` outputs (a linen module,
    or for the NNX ``llama`` an :class:`NNXModel`: the same ``init``/``apply``).

    Raises ``ValueError`` for an unknown name (listing the known ones), ``TypeError`` for an
    option the model does not take (naming it), and ``ValueError``/``TypeError`` for a bad
    option value.

    >>> get_model("resnet20", 10, norm_affine=False).norm_affine
    False
    >>> get_model("lenet300", 10, norm="batch")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: model 'lenet300' got unknown option(s) 'norm'; accepted options: use_bias, ...
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    cls, fixed, accepted = _REGISTRY[name]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown option(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted options: {', '.join(accepted)}"
        )
    for key, value in options.items():
        _OPTION_CHECKS[key](key, value)
    if "hidden" in options:  # a tuple (hashable; JSON gives a list)
        options["hidden"] = tuple(int(v) for v in options["hidden"])
    if name == "vit_small":
        dim = options.get("embed_dim", ViT.embed_dim)
        heads = options.get("num_heads", ViT.num_heads)
        if dim % heads != 0:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={heads}")
    if name == "vit_nnx":  # before anything is built
        defaults = inspect.signature(ViTNNX.__init__).parameters
        dim, heads, size, patch = (options.get(key, defaults[key].default) for key in
                                   ("embed_dim", "num_heads", "image_size", "patch_size"))
        if dim % heads != 0:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={heads}")
        if size % patch != 0:
            raise ValueError(f"image_size={size} is not divisible by patch_size={patch}")
    if name == "gpt":
        dim, heads = options.get("n_embd", GPT.n_embd), options.get("n_head", GPT.n_head)
        if dim % heads != 0:
            raise ValueError(f"n_embd={dim} is not divisible by n_head={heads}")
    if name == "llama":  # before anything is built
        defaults = inspect.signature(Llama.__init__).parameters
        check_heads(*(options.get(key, defaults[key].default)
                      for key in ("n_embd", "n_head", "n_kv_head")))
    return cls(num_classes=int(num_classes), **fixed, **options)


def init_model(
    model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Initialise ``model`` on zeros of ``input_shape`` (batch dimension included).

    Returns ``(params, model_state)``: ``params`` is the ``params`` collection (masked from
    outside) and ``model_state`` a dict of the other collections, e.g.
    ``{"batch_stats": ...}`` for models with batch norm, else ``{}``.

    >>> import jax
    >>> params, state = init_model(get_model("lenet300", 10), jax.random.key(0), (1, 784))
    >>> params["fc1"]["kernel"].shape, state
    ((784, 300), {})
    """
    shape = tuple(input_shape)
    if not shape or not all(_is_int(d) and d >= 1 for d in shape):
        raise ValueError(
            "input_shape must be a tuple of positive ints with the batch first, "
            f"got {input_shape!r}"
        )
    variables = flax.core.unfreeze(model.init(rng, jnp.zeros(shape, jnp.float32), train=False))
    params = variables.pop("params", {})
    return params, variables


def apply_model(
    model: nn.Module,
    params: Any,
    model_state: dict[str, Any],
    images: jax.Array,
    *,
    train: bool,
) -> tuple[jax.Array, dict[str, Any]]:
    """Run ``model`` on ``images``; returns ``(logits, new_model_state)``.

    With ``train=True`` batch norm uses batch statistics and the updated running statistics
    are returned; with ``train=False`` it uses the running statistics and ``model_state`` is
    returned unchanged. ``train`` must be a Python bool (static under ``jit``).

    >>> import jax, jax.numpy as jnp
    >>> model = get_model("resnet20", 10)
    >>> params, state = init_model(model, jax.random.key(0), (1, 8, 8, 3))
    >>> step = jax.jit(apply_model, static_argnums=0, static_argnames="train")
    >>> logits, new_state = step(model, params, state, jnp.ones((2, 8, 8, 3)), train=True)
    >>> logits.shape, sorted(new_state)
    ((2, 10), ['batch_stats'])
    """
    variables = {"params": params, **model_state}
    if train and model_state:
        logits, updates = model.apply(variables, images, train=True, mutable=list(model_state))
        return logits, {**model_state, **flax.core.unfreeze(updates)}
    return model.apply(variables, images, train=train), model_state
