"""Conv-2/4/6/8 of the lottery-ticket paper (Frankle & Carbin 2019) and Edge-Popup."""

from __future__ import annotations

import flax.linen as nn
import jax

from sparsejax.harness.models._layers import (
    as_float,
    check_images,
    check_norm,
    glorot_normal,
    norm_layer,
    scaled,
)

PAIR_CHANNELS: tuple[int, ...] = (64, 128, 256, 512)


class ConvNet(nn.Module):
    """Conv-``2 * num_pairs``: pairs of 3x3 SAME convs, each pair followed by 2x2 max-pool.

    Channels per pair are 64, 128, 256, 512 (times ``width``); then Dense 256, Dense 256 and
    the classifier, ReLU after every hidden layer. Submodules ``conv1``..``conv{2n}`` (and
    ``bn1``.. with ``norm='batch'``), ``fc1``, ``fc2``, ``head``. With ``norm='batch'`` the
    convs have no bias (batch norm follows each of them). Kernels use Glorot-normal init.

    >>> import jax, jax.numpy as jnp
    >>> model = ConvNet(num_classes=10, num_pairs=1)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    >>> model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
    """

    num_classes: int
    num_pairs: int = 1
    use_bias: bool = True
    norm: str = "none"
    norm_affine: bool = True
    width: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_norm(self.norm)
        if not 1 <= self.num_pairs <= len(PAIR_CHANNELS):
            raise ValueError(f"num_pairs must be in 1..{len(PAIR_CHANNELS)}, got {self.num_pairs}")
        x = as_float(x)
        check_images(x, f"conv{2 * self.num_pairs}")
        conv_bias = self.use_bias and self.norm == "none"
        index = 0
        for channels in PAIR_CHANNELS[: self.num_pairs]:
            for _ in range(2):
                index += 1
                x = nn.Conv(
                    scaled(channels, self.width),
                    (3, 3),
                    padding="SAME",
                    use_bias=conv_bias,
                    kernel_init=glorot_normal,
                    name=f"conv{index}",
                )(x)
                x = norm_layer(
                    x, norm=self.norm, affine=self.norm_affine, train=train, name=f"bn{index}"
                )
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape((x.shape[0], -1))
        for i in (1, 2):
            x = nn.Dense(
                scaled(256, self.width),
                use_bias=self.use_bias,
                kernel_init=glorot_normal,
                name=f"fc{i}",
            )(x)
            x = nn.relu(x)
        return nn.Dense(
            self.num_classes, use_bias=self.use_bias, kernel_init=glorot_normal, name="head"
        )(x)
