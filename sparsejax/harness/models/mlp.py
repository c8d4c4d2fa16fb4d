"""Fully connected networks: LeNet-300-100 of the lottery-ticket experiments, and the MLP
with configurable hidden layers (40-500-500-10 of the MNIST-1D lottery tickets)."""

from __future__ import annotations

import flax.linen as nn
import jax

from sparsejax.harness.models._layers import as_float, kernel_initializer, scaled


class LeNet300(nn.Module):
    """LeNet-300-100: flatten, Dense 300, ReLU, Dense 100, ReLU, Dense ``num_classes``.

    Submodules ``fc1``, ``fc2``, ``head``. Any input is flattened per example, so MNIST can be
    given as ``(batch, 784)`` or ``(batch, 28, 28, 1)``. Kernels use Glorot-normal init
    (``kernel_init="glorot_normal"``), or ``"lecun_normal"``: variance scaling, scale 1,
    fan_in, truncated normal, the init of the SNIP reference code (see
    :data:`sparsejax.harness.models._layers.KERNEL_INITS`); biases start at zero.
    ``hidden`` holds the hidden widths (before ``width`` scales them).

    >>> import jax, jax.numpy as jnp
    >>> model = LeNet300(num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 784)))
    >>> model.apply(variables, jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
    """

    num_classes: int
    use_bias: bool = True
    width: float = 1.0
    hidden: tuple[int, ...] = (300, 100)
    kernel_init: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no train-time behaviour
        x = as_float(x)
        if x.ndim < 2:
            raise ValueError(
                f"{type(self).__name__} expects a batch (rank >= 2), got shape {x.shape}"
            )
        x = x.reshape((x.shape[0], -1))
        kernel_init = kernel_initializer(self.kernel_init)
        for i, features in enumerate(self.hidden, start=1):
            x = nn.Dense(
                scaled(features, self.width),
                use_bias=self.use_bias,
                kernel_init=kernel_init,
                name=f"fc{i}",
            )(x)
            x = nn.relu(x)
        return nn.Dense(
            self.num_classes, use_bias=self.use_bias, kernel_init=kernel_init, name="head"
        )(x)


class MLP(LeNet300):
    """An MLP: flatten, one Dense + ReLU per entry of ``hidden``, Dense ``num_classes``.

    The default ``hidden=(500, 500)`` is the MLP of the MNIST-1D lottery tickets
    (40-500-500-10 on its length-40 inputs). Submodules ``fc1`` ... ``fcN``, ``head``;
    Glorot-normal kernels unless ``kernel_init`` says otherwise, as :class:`LeNet300`
    (which is this network with ``(300, 100)``).

    >>> import jax, jax.numpy as jnp
    >>> params = MLP(num_classes=10).init(jax.random.key(0), jnp.zeros((1, 40, 1)))["params"]
    >>> [params[k]["kernel"].shape for k in ("fc1", "fc2", "head")]
    [(40, 500), (500, 500), (500, 10)]
    """

    hidden: tuple[int, ...] = (500, 500)
