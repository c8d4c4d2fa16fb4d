"""Shared building blocks for the models: norms, convolutions, input checks.

Conventions (relied on by the maskers, which see the params pytree from outside):

* weight matrices are leaves named ``kernel`` (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``);
* biases are ``bias``; batch norm keeps ``scale``/``bias`` in ``params`` (only when affine) and
  ``mean``/``var`` in the ``batch_stats`` collection;
* when a convolution is followed by batch norm it has no bias (the norm's mean subtraction
  cancels it); ``use_bias`` governs every other layer.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_KINDS: tuple[str, ...] = ("batch", "none")
BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1
BN_EPSILON = 1e-5

glorot_normal = nn.initializers.glorot_normal()
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# The kernel initialisers a model may be asked for by name (model option ``kernel_init``).
# ``lecun_normal`` is variance scaling with scale 1, fan_in, truncated normal: std
# sqrt(1 / fan_in), cut at 2 standard deviations of the underlying normal (whose std is
# corrected up so that the truncated draw has the target std), which is TensorFlow's
# ``tf.variance_scaling_initializer()``, the init of the SNIP reference code.
KERNEL_INITS: dict[str, Any] = {
    "glorot_normal": glorot_normal,
    "lecun_normal": nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
}


def kernel_initializer(name: str) -> Any:
    """The kernel initialiser called ``name`` in :data:`KERNEL_INITS`.

    >>> import jax
    >>> w = kernel_initializer("lecun_normal")(jax.random.key(0), (400, 300))
    >>> round(float(w.std() * 20), 1)  # std sqrt(1 / fan_in) = 1 / 20
    1.0
    """
    if name not in KERNEL_INITS:
        raise ValueError(f"kernel_init must be one of {tuple(KERNEL_INITS)}, got {name!r}")
    return KERNEL_INITS[name]


def check_norm(norm: str) -> None:
    """Raise ``ValueError`` unless ``norm`` is one of :data:`NORM_KINDS`."""
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    return max(1, int(round(channels * width)))


def as_float(x: Any) -> jax.Array:
    """``x`` as a floating array (integer images, e.g. uint8, become float32)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def check_images(x: jax.Array, model: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a batch of NHWC images."""
    if x.ndim != 4:
        raise ValueError(
            f"{model} expects a batch of NHWC images (rank 4), got shape {tuple(x.shape)}"
        )


def norm_layer(x: jax.Array, *, norm: str, affine: bool, train: bool, name: str) -> jax.Array:
    """Batch norm (``norm='batch'``) or the identity (``norm='none'``).

    Must be called from inside a compact ``__call__``: the norm becomes a submodule of the
    module being run. Without ``affine`` the norm has no params, only ``batch_stats``.
    """
    check_norm(norm)
    if norm == "none":
        return x
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_scale=affine,
        use_bias=affine,
        name=name,
    )(x)


def conv3x3(
    features: int, *, strides: int = 1, use_bias: bool, name: str, kernel_init: Any
) -> nn.Conv:
    """A 3x3 convolution with one pixel of zero padding on each side (PyTorch-style)."""
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        kernel_init=kernel_init,
        name=name,
    )


def conv1x1(
    features: int, *, strides: int = 1, use_bias: bool, name: str, kernel_init: Any
) -> nn.Conv:
    """A 1x1 (projection) convolution."""
    return nn.Conv(
        features,
        (1, 1),
        strides=(strides, strides),
        padding="VALID",
        use_bias=use_bias,
        kernel_init=kernel_init,
        name=name,
    )
