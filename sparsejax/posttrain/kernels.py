"""Every prunable linear map as the 2-D matrix ``(in, out)`` the per-layer pruners take.

A :class:`KernelLayout` says how a layer's kernel and its input map to that matrix. A
Dense (linen ``nn.Dense``, NNX ``nnx.Linear``) kernel already is ``(in, out)`` and its
input is flattened to ``(tokens, in)``. An einsum layer (linen ``nn.Einsum``, NNX
``nnx.Einsum``: ``y = einsum(equation, x, kernel)``) is the same map once its kernel is
seen as ``(prod(contracted axes), prod(output axes))``: the contracted axes (kernel axes
the input has and the output lacks) come first, in the kernel's order, then the output
axes, in the kernel's order; the input is transposed to (its other axes, the contracted
axes in the kernel's order) and flattened to ``(tokens, prod(contracted axes))``. So an
attention query ``"btd,dhk->bthk"`` is the matrix ``(d, h*k)``, an output projection
``"bthk,hkd->btd"`` the matrix ``(h*k, d)``, and N:M groups run along the flattened
input features in row-major order: the last contracted axis is the fastest (2:4 groups of
4 consecutive ``k`` within one head for ``"hkd"``). The pruners run unchanged on that
matrix (:func:`prune_kernel`), and the pruned matrix is reshaped back.

Refused (a ``ValueError`` naming the layer, raised only when its kernel is to be pruned):
an einsum whose kernel has an axis the output also has (a per-head batched kernel such as
``"bhtd,hdk->bhtk"``) or an axis summed alone, an input axis summed away without the
kernel, repeated letters within one operand, an ellipsis in the kernel, no contracted
axis; conv kernels (``nn.Conv``, ``nn.ConvTranspose``, ``nn.ConvLocal``, ``nnx.Conv``,
``nnx.ConvTranspose``: their im2col inputs are not implemented).

>>> import jax.numpy as jnp
>>> layout = KernelLayout.einsum("btd,dhk->bthk")
>>> layout.matrix_shape((8, 2, 4)), layout.inputs(jnp.ones((3, 5, 8))).shape
((8, 8), (15, 8))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.patterns import Pattern
from sparsejax.posttrain.pruners import (
    PosttrainMethod,
    hessian_reconstruction_error,
    prune_layer_hessian,
)

__all__ = ["KernelLayout", "DENSE", "layer_layout", "nnx_layer_classes", "prune_kernel"]

_DENSE_EQUATION = "...i,io->...o"
_CONVS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal)


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How one layer's kernel and input map to the matrix ``(in, out)``: its einsum
    ``equation`` (a Dense layer: ``"...i,io->...o"``) or, for a layer that cannot be
    pruned, why not (``refused``). Hashable: a static argument of a jitted function.

    >>> layout = KernelLayout.einsum("bthk,hkd->btd")
    >>> kernel = jnp.arange(24.0).reshape(2, 3, 4)
    >>> layout.to_matrix(kernel).shape, (layout.from_matrix(layout.to_matrix(kernel),
    ...                                                     kernel.shape) == kernel).all()
    ((6, 4), Array(True, dtype=bool))
    """

    equation: str = _DENSE_EQUATION
    refused: str | None = None

    @classmethod
    def einsum(cls, equation: str) -> KernelLayout:
        """The layout of ``y = einsum(equation, x, kernel)``, or a refused one saying why
        the design cannot prune it (see the module docstring)."""
        equation = equation.replace(" ", "")
        try:
            _parse(equation)
        except ValueError as error:
            return cls(equation, f"einsum {equation!r} {error}")
        return cls(equation)

    def check(self, name: str) -> None:
        """``ValueError`` naming the layer ``name`` if it cannot be pruned."""
        if self.refused is not None:
            raise ValueError(f"{name}: {self.refused}; leave its kernel out of `prunable` "
                             "to keep it dense")

    def input_perm(self, ndim: int) -> tuple[int, ...]:
        """The input's axes reordered as (token axes, contracted axes in kernel order)."""
        lhs, rhs, _ = _parse(self.equation)
        lhs = _expand(lhs, ndim)
        tokens = [i for i, c in enumerate(lhs) if c not in rhs]
        return tuple(tokens + [lhs.index(c) for c in rhs if c in lhs])

    def features_in(self, shape: tuple[int, ...]) -> int:
        """The matrix's input size for an input of ``shape``."""
        lhs, rhs, _ = _parse(self.equation)
        lhs = _expand(lhs, len(shape))
        return math.prod(int(shape[lhs.index(c)]) for c in rhs if c in lhs)

    def inputs(self, x: jax.Array) -> jax.Array:
        """The input as ``(tokens, in)`` rows of the matrix's input features."""
        size, perm = self.features_in(np.shape(x)), self.input_perm(x.ndim)
        if perm != tuple(range(x.ndim)):
            x = jnp.transpose(x, perm)
        return jnp.reshape(x, (-1, size))

    def _kernel_perm(self, ndim: int) -> tuple[tuple[int, ...], int]:
        lhs, rhs, _ = _parse(self.equation)
        if len(rhs) != ndim:
            raise ValueError(f"einsum {self.equation!r} names {len(rhs)} kernel axes, the "
                             f"kernel has {ndim}")
        contracted = [i for i, c in enumerate(rhs) if c in lhs]
        return tuple(contracted + [i for i, c in enumerate(rhs) if c not in lhs]), \
            len(contracted)

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The matrix ``(in, out)`` of a kernel of ``shape``."""
        perm, split = self._kernel_perm(len(shape))
        dims = [int(shape[i]) for i in perm]
        return math.prod(dims[:split]), math.prod(dims[split:])

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        """The kernel as the matrix ``(in, out)``."""
        shape, (perm, _) = self.matrix_shape(np.shape(kernel)), self._kernel_perm(kernel.ndim)
        if perm != tuple(range(kernel.ndim)):
            kernel = jnp.transpose(kernel, perm)
        return jnp.reshape(kernel, shape)

    def from_matrix(self, matrix: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The inverse of :meth:`to_matrix` for a kernel of ``shape``."""
        perm, _ = self._kernel_perm(len(shape))
        kernel = jnp.reshape(matrix, tuple(int(shape[i]) for i in perm))
        return kernel if perm == tuple(range(len(shape))) else jnp.transpose(
            kernel, tuple(int(i) for i in np.argsort(perm)))


DENSE = KernelLayout()
"""The layout of a Dense (``nn.Dense``, ``nnx.Linear``) layer: the kernel is the matrix."""


def _expand(lhs: str, ndim: int) -> str:
    """The input's letters with an ellipsis replaced by one digit per axis it covers."""
    if "..." not in lhs:
        return lhs
    head, tail = lhs.split("...")
    return head + "".join(str(i % 10) for i in range(ndim - len(head) - len(tail))) + tail


def _parse(equation: str) -> tuple[str, str, str]:
    """``(input, kernel, output)`` letters of a prunable einsum; ``ValueError`` (a reason,
    completing "einsum '...' ") for one the matrix view cannot handle."""
    if equation.count("->") != 1 or equation.count(",") != 1:
        raise ValueError("is not an explicit two-operand equation 'x,kernel->y'")
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    if "..." in rhs:
        raise ValueError("has an ellipsis in the kernel")
    if ("..." in lhs) != ("..." in out):
        raise ValueError("sums away the axes of the input's ellipsis")
    bare = [part.replace("...", "") for part in (lhs, rhs, out)]
    for part in bare:
        if not part.isalpha() and part:
            raise ValueError(f"has a non-letter axis in {part!r}")
        if len(set(part)) != len(part):
            raise ValueError(f"repeats an axis letter in {part!r} (a diagonal or trace)")
    lhs_b, rhs_b, out_b = bare
    for c in rhs_b:
        if c in lhs_b and c in out_b:
            raise ValueError(f"keeps kernel axis {c!r} in the output (a kernel axis that is "
                             "also a batch axis of the output, e.g. one matrix per head)")
        if c not in lhs_b and c not in out_b:
            raise ValueError(f"sums kernel axis {c!r} alone")
    for c in lhs_b:
        if c not in rhs_b and c not in out_b:
            raise ValueError(f"sums input axis {c!r} away without the kernel")
    if not any(c in lhs_b for c in rhs_b):
        raise ValueError("contracts no axis of the input with the kernel")
    if any(c not in lhs_b + rhs_b for c in out_b):
        raise ValueError("has an output axis in neither operand")
    return lhs, rhs_b, out


def layer_layout(module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 ) -> KernelLayout | None:
    """The layout of a call ``module(*args, **kwargs)`` of a layer with a kernel (linen
    or NNX Dense/Linear, Einsum, Conv), ``None`` for any other module. The einsum
    equation is the call's ``einsum_str`` if given, else the module's.

    >>> import flax.linen as nn
    >>> layer_layout(nn.Dense(3), (), {}) == DENSE
    True
    """
    from flax import nnx

    if isinstance(module, (nn.Dense, nnx.Linear)):
        return DENSE
    if isinstance(module, (nn.Einsum, nnx.Einsum)):
        equation = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        equation = equation if equation is not None else module.einsum_str
        return KernelLayout.einsum(str(equation))
    if isinstance(module, (*_CONVS, nnx.Conv, nnx.ConvTranspose)):
        kind = ("nn." if isinstance(module, nn.Module) else "nnx.") + type(module).__name__
        return KernelLayout("", f"is a {kind} (a conv kernel); post-training pruning of conv "
                                "kernels (their im2col inputs) is not supported")
    return None


def nnx_layer_classes() -> tuple[type, ...]:
    """The NNX layer classes :func:`layer_layout` knows, whose ``__call__`` capture wraps."""
    from flax import nnx

    return (nnx.Linear, nnx.Einsum, nnx.Conv, nnx.ConvTranspose)


def prune_kernel(method: PosttrainMethod, kernel: jax.Array, hessian: jax.Array,
                 layout: KernelLayout, pattern: Pattern, sparsity: float | None,
                 name: str, **options: Any) -> tuple[jax.Array, float, float]:
    """Prune one layer's kernel as its matrix ``(in, out)`` from ``H = X^T X`` of its
    flattened inputs by :func:`~sparsejax.posttrain.pruners.prune_layer_hessian`, the one
    per-layer step of every driver: the pruned kernel (in its own shape), its density
    and its reconstruction error. ``ValueError`` messages start with ``name``.

    >>> import jax.numpy as jnp
    >>> kernel, density, _ = prune_kernel("magnitude", jnp.arange(1.0, 9.0).reshape(2, 2, 2),
    ...                                   jnp.eye(2), KernelLayout.einsum("bd,dhk->bhk"),
    ...                                   Pattern.parse("unstructured"), 0.5, "q")
    >>> kernel.tolist(), density
    ([[[0.0, 0.0], [0.0, 0.0]], [[5.0, 6.0], [7.0, 8.0]]], 0.5)
    """
    layout.check(name)
    matrix = layout.to_matrix(kernel)
    try:
        result = prune_layer_hessian(method, matrix, hessian, pattern, sparsity, **options)
    except ValueError as error:
        raise ValueError(f"{name}/kernel: {error}") from None
    error = hessian_reconstruction_error(matrix, result.kernel, hessian)
    return (layout.from_matrix(result.kernel, np.shape(kernel)),
            float(jnp.mean(result.mask)), float(error))
