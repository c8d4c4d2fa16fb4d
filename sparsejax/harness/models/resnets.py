"""CIFAR-style residual networks: ResNet-18, ResNet-20 and the pre-activation WRN-22-2."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.harness.models._layers import (
    as_float,
    check_images,
    check_norm,
    conv1x1,
    conv3x3,
    he_normal_fan_out,
    norm_layer,
    scaled,
)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-norm-ReLU-conv-norm, plus shortcut, then ReLU.

    The shortcut is the identity, or a strided 1x1 conv + norm (``shortcut_conv``,
    ``shortcut_bn``) when the shape changes.
    """

    features: int
    strides: int = 1
    use_bias: bool = True
    norm: str = "batch"
    norm_affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv_bias = self.use_bias and self.norm == "none"

        def norm(y: jax.Array, name: str) -> jax.Array:
            return norm_layer(y, norm=self.norm, affine=self.norm_affine, train=train, name=name)

        y = conv3x3(
            self.features,
            strides=self.strides,
            use_bias=conv_bias,
            kernel_init=he_normal_fan_out,
            name="conv1",
        )(x)
        y = nn.relu(norm(y, "bn1"))
        y = conv3x3(self.features, use_bias=conv_bias, kernel_init=he_normal_fan_out, name="conv2")(
            y
        )
        y = norm(y, "bn2")
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv1x1(
                self.features,
                strides=self.strides,
                use_bias=conv_bias,
                kernel_init=he_normal_fan_out,
                name="shortcut_conv",
            )(x)
            x = norm(x, "shortcut_bn")
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (no max-pool), stages of :class:`BasicBlock`, global average
    pool, Dense classifier.

    ``stage_sizes`` blocks per stage with ``stage_widths`` channels (times ``width``); the first
    stage keeps the resolution, each later one halves it. Submodules ``stem_conv``,
    ``stem_bn``, ``stage{s}_block{b}``, ``head``. With ``norm='batch'`` the convs have no bias.
    Conv kernels use He-normal (fan-out) init.

    >>> import jax, jax.numpy as jnp
    >>> model = ResNet(num_classes=10, stage_sizes=(1, 1), stage_widths=(8, 16))
    >>> variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> sorted(variables)
    ['batch_stats', 'params']
    >>> model.apply(variables, jnp.zeros((2, 8, 8, 3))).shape
    (2, 10)
    """

    num_classes: int
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    stage_widths: tuple[int, ...] = (64, 128, 256, 512)
    use_bias: bool = True
    norm: str = "batch"
    norm_affine: bool = True
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_norm(self.norm)
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError("stage_sizes and stage_widths must have the same length")
        x = as_float(x)
        check_images(x, type(self).__name__)
        conv_bias = self.use_bias and self.norm == "none"
        x = conv3x3(
            scaled(self.stage_widths[0], self.width),
            use_bias=conv_bias,
            kernel_init=he_normal_fan_out,
            name="stem_conv",
        )(x)
        x = norm_layer(x, norm=self.norm, affine=self.norm_affine, train=train, name="stem_bn")
        x = nn.relu(x)
        for s, (blocks, channels) in enumerate(
            zip(self.stage_sizes, self.stage_widths, strict=True), 1
        ):
            for b in range(1, blocks + 1):
                x = BasicBlock(
                    scaled(channels, self.width),
                    strides=2 if (s > 1 and b == 1) else 1,
                    use_bias=self.use_bias,
                    norm=self.norm,
                    norm_affine=self.norm_affine,
                    name=f"stage{s}_block{b}",
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="head")(x)


class PreActBlock(nn.Module):
    """Pre-activation wide-ResNet block: norm-ReLU-conv-norm-ReLU-conv, plus shortcut.

    When the shape changes the shortcut is a strided 1x1 conv (``shortcut_conv``) applied to
    the pre-activated input, as in Zagoruyko & Komodakis (2016).
    """

    features: int
    strides: int = 1
    use_bias: bool = True
    norm: str = "batch"
    norm_affine: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv_bias = self.use_bias and self.norm == "none"

        def norm(y: jax.Array, name: str) -> jax.Array:
            return norm_layer(y, norm=self.norm, affine=self.norm_affine, train=train, name=name)

        pre = nn.relu(norm(x, "bn1"))
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv1x1(
                self.features,
                strides=self.strides,
                use_bias=conv_bias,
                kernel_init=he_normal_fan_out,
                name="shortcut_conv",
            )(pre)
        else:
            shortcut = x
        y = conv3x3(
            self.features,
            strides=self.strides,
            use_bias=conv_bias,
            kernel_init=he_normal_fan_out,
            name="conv1",
        )(pre)
        y = nn.relu(norm(y, "bn2"))
        y = conv3x3(self.features, use_bias=conv_bias, kernel_init=he_normal_fan_out, name="conv2")(
            y
        )
        return y + shortcut


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet-``depth``-``widen`` for CIFAR (Zagoruyko & Komodakis).

    A 3x3 stem conv with 16 channels, three groups of ``(depth - 4) // 6`` :class:`PreActBlock`
    with 16k, 32k, 64k channels (k = ``widen``; strides 1, 2, 2), a final norm + ReLU, global
    average pool and a Dense classifier; no dropout. ``width`` scales every conv. Submodules
    ``stem_conv``, ``group{g}_block{b}``, ``final_bn``, ``head``. With ``norm='batch'`` the
    convs have no bias.

    >>> import jax, jax.numpy as jnp
    >>> model = WideResNet(num_classes=10, depth=10, widen=1)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> model.apply(variables, jnp.zeros((2, 8, 8, 3))).shape
    (2, 10)
    """

    num_classes: int
    depth: int = 22
    widen: int = 2
    use_bias: bool = True
    norm: str = "batch"
    norm_affine: bool = True
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_norm(self.norm)
        if self.depth < 10 or (self.depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
        blocks = (self.depth - 4) // 6
        x = as_float(x)
        check_images(x, f"wrn{self.depth}_{self.widen}")
        conv_bias = self.use_bias and self.norm == "none"
        x = conv3x3(
            scaled(16, self.width),
            use_bias=conv_bias,
            kernel_init=he_normal_fan_out,
            name="stem_conv",
        )(x)
        for g, channels in enumerate((16, 32, 64), 1):
            for b in range(1, blocks + 1):
                x = PreActBlock(
                    scaled(channels * self.widen, self.width),
                    strides=2 if (g > 1 and b == 1) else 1,
                    use_bias=self.use_bias,
                    norm=self.norm,
                    norm_affine=self.norm_affine,
                    name=f"group{g}_block{b}",
                )(x, train=train)
        x = norm_layer(x, norm=self.norm, affine=self.norm_affine, train=train, name="final_bn")
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="head")(x)
