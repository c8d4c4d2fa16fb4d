"""Export a masked model for sparse inference: BCOO kernels and a packed N:M form.

Two stored forms of a masked Dense kernel ``(in, out)``:

* :func:`to_bcoo`: ``jax.experimental.sparse.BCOO`` holding exactly the kept entries
  (``nse`` is the mask's count; any mask, "unstructured");
* :func:`nm_pack`: :class:`NMPacked`, for a kernel in an N:M pattern: along the pattern's
  axis, each group of ``M`` becomes its ``N`` kept values and their ``uint8`` positions in
  the group (for ``(in, out)`` and ``2:4``: values and positions of shape ``(in / 2,
  out)``); :func:`nm_unpack` is its exact inverse and :func:`nm_matmul` computes ``x @
  kernel`` from it, by a gather of the kept inputs (or by unpacking inside the
  computation, ``product='unpack'``). jax 0.10 has no N:M format of its own, so this one
  is written here (docs/design.md).

:func:`sparse_params` turns a params tree and its masks into a tree whose prunable Dense
kernels are in one of these forms, and :func:`sparse_apply` runs a Flax linen model on
it: every ``nn.Dense`` whose kernel is sparse computes its product from the sparse form.

>>> import jax, jax.numpy as jnp
>>> kernel = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])  # 2:4 per column
>>> packed = nm_pack(kernel, "2:4")
>>> packed.values.T, packed.positions.T
(Array([[1., 3.],
       [0., 2.]], dtype=float32), Array([[0, 2],
       [0, 1]], dtype=uint8))
>>> bool(jnp.all(nm_unpack(packed) == kernel)), to_bcoo(kernel).nse
(True, 3)
>>> nm_matmul(jnp.ones((1, 4)), packed)
Array([[4., 2.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import TYPE_CHECKING, Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core._tree import map_with_path
from sparsejax.core.masks import Prunable, apply_masks, default_prunable
from sparsejax.core.patterns import (
    NM,
    Pattern,
    as_pattern,
    nm_group_topk,
    nm_groups,
    nm_ungroup,
)
from sparsejax.core.validation import (
    check_binary_masks,
    check_same_structure,
    check_traced,
    is_concrete,
)
from sparsejax.posttrain.capture import dense_input, is_dense_call

if TYPE_CHECKING:
    from jax.experimental import sparse

__all__ = [
    "NMPacked",
    "to_bcoo",
    "nm_pack",
    "nm_unpack",
    "nm_matmul",
    "sparse_matmul",
    "sparse_params",
    "export_state",
    "sparse_apply",
]


NMProduct = Literal["gather", "unpack"]
NM_PRODUCTS: tuple[str, ...] = ("gather", "unpack")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMPacked:
    """A kernel in an N:M pattern, packed: along ``pattern.axis`` every group of ``M``
    entries is stored as its ``N`` kept ``values`` and their ``positions`` in the group
    (``uint8``, ascending), so both arrays have the kernel's shape with that axis cut to
    ``length * N / M``. ``shape`` and ``pattern`` are static (pytree metadata): an
    ``NMPacked`` goes through ``jit`` as two arrays."""

    values: jax.Array
    positions: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    pattern: Pattern = dataclasses.field(metadata={"static": True})

    @property
    def dtype(self) -> Any:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Stored bytes: the values and the positions."""
        return int(self.values.nbytes + self.positions.nbytes)


def _packed_groups(pattern: Pattern) -> Pattern:
    """The packed arrays' own groups: ``N`` consecutive entries along the same axis (the
    kept entries of one group of ``M``), so :func:`nm_groups` reads them as rows."""
    return NM(pattern.n, pattern.n, pattern.axis)


def _check_2d(kernel: Any, where: str) -> None:
    if np.ndim(kernel) != 2:
        raise ValueError(f"{where}: a sparse form holds a Dense kernel (in, out), got shape "
                         f"{tuple(np.shape(kernel))}")


def _mask_of(kernel: Any, mask: Any, where: str) -> Any:
    """``mask`` as bool of ``kernel``'s shape (checked), or the kernel's non-zeros."""
    if mask is None:
        return jnp.asarray(kernel) != 0
    if np.shape(mask) != np.shape(kernel):
        raise ValueError(f"{where}: mask shape {tuple(np.shape(mask))} differs from the "
                         f"kernel's {tuple(np.shape(kernel))}")
    check_binary_masks({where: mask})
    return jnp.asarray(mask) != 0


def to_bcoo(kernel: jax.Array, mask: jax.Array | None = None, *,
            where: str = "kernel") -> sparse.BCOO:
    """``kernel`` as a BCOO matrix holding exactly the entries ``mask`` keeps (default:
    its non-zeros), so ``nse`` is the mask's count and ``todense()`` is the masked kernel,
    bitwise (a kept weight that happens to be zero stays stored). Indices are row-major
    and sorted. Runs on the host: ``kernel`` and ``mask`` must be concrete (not traced).

    >>> import jax.numpy as jnp
    >>> b = to_bcoo(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[True, False], [False, True]]))
    >>> b.nse, b.todense()
    (2, Array([[1., 0.],
           [0., 4.]], dtype=float32))
    """
    _check_2d(kernel, where)
    if not (is_concrete(kernel) and (mask is None or is_concrete(mask))):
        raise TypeError(f"{where}: to_bcoo runs on the host (the count fixes the array "
                        "sizes); call it outside jit")
    kept = np.asarray(_mask_of(kernel, mask, where))
    rows, cols = np.nonzero(kept)
    data = np.asarray(kernel)[rows, cols]
    indices = np.stack([rows, cols], axis=1).astype(np.int32)
    from jax.experimental import sparse  # on first use: 0.2 s that import sparsejax skips

    return sparse.BCOO((jnp.asarray(data), jnp.asarray(indices)), shape=kept.shape,
                       indices_sorted=True, unique_indices=True)


def nm_pack(kernel: jax.Array, pattern: str | Pattern, mask: jax.Array | None = None, *,
            where: str = "kernel") -> NMPacked:
    """Pack a kernel that satisfies an N:M ``pattern`` (:class:`NMPacked`).

    The kept positions of each group are those ``mask`` keeps (default: the kernel's
    non-zeros, topped up to ``N`` with the group's first zeros); a group with more than
    ``N`` of them raises ``ValueError`` naming ``where``. Values outside the mask are
    dropped, so :func:`nm_unpack` returns the masked kernel, bitwise. Under ``jit`` the
    values are not known when it is traced: the check is then a ``checkify`` check the
    caller opts into (``jax.experimental.checkify.checkify(f)``; no host callback in the
    program), and without it a group with more than ``N`` keeps the first ``N`` of them.

    >>> import jax.numpy as jnp
    >>> nm_pack(jnp.array([[1.0], [2.0], [3.0], [0.0]]), "2:4", where="fc1/kernel")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fc1/kernel: 1 group of 4 along axis -2 keeps more than 2 entries (up to 3), ...
    """
    pattern = as_pattern(pattern)
    if not isinstance(pattern, NM):
        raise ValueError(f"{where}: nm_pack needs an N:M pattern, got {pattern}")
    if pattern.m > 256:
        raise ValueError(f"{where}: nm_pack stores positions as uint8, so M <= 256; got "
                         f"pattern {pattern}")
    kernel = jnp.asarray(kernel)
    pattern.check_shape(kernel.shape, where=where)
    values, positions, counts = _pack(kernel, _mask_of(kernel, mask, where), pattern)

    def message(groups: str, verb: str, most: str) -> str:
        return (f"{where}: {groups} of {pattern.m} along axis {pattern.axis} {verb} more "
                f"than {pattern.n} entries ({most}), so the kernel is not in pattern {pattern}")

    if is_concrete(counts):
        over = int(np.sum(np.asarray(counts) > pattern.n))
        if over:
            raise ValueError(message(f"{over} group" + ("s" if over > 1 else ""),
                                     "keep" if over > 1 else "keeps",
                                     f"up to {int(np.asarray(counts).max())}"))
    else:
        check_traced(jnp.all(counts <= pattern.n),
                     message("a group", "keeps", "checked under checkify"))
    return NMPacked(values, positions, tuple(int(d) for d in kernel.shape), pattern)


@functools.partial(jax.jit, static_argnames="pattern")
def _pack(kernel: jax.Array, kept: jax.Array,
          pattern: Pattern) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The packed values and positions, and the kept count of every group."""
    counts = jnp.sum(nm_groups(kept, pattern), axis=1, dtype=jnp.int32)
    # exactly N per group: every kept entry, then the group's first others
    chosen = nm_groups(nm_group_topk(kept.astype(jnp.float32), pattern, pattern.n), pattern)
    positions = jnp.argsort(~chosen, axis=1, stable=True)[:, : pattern.n]  # ascending
    values = jnp.take_along_axis(nm_groups(jnp.where(kept, kernel, 0), pattern),
                                 positions, axis=1)
    packed_shape = list(kernel.shape)
    packed_shape[pattern.axis] = kernel.shape[pattern.axis] // pattern.m * pattern.n
    groups = _packed_groups(pattern)
    return (nm_ungroup(values, groups, tuple(packed_shape)),
            nm_ungroup(positions.astype(jnp.uint8), groups, tuple(packed_shape)), counts)


def nm_unpack(packed: NMPacked) -> jax.Array:
    """The dense kernel of an :class:`NMPacked` (zeros outside the kept positions); the
    exact inverse of :func:`nm_pack` on a masked kernel. Called eagerly, positions outside
    ``0 .. M - 1`` (an edited or corrupt pack) are a ``ValueError``.

    >>> import jax.numpy as jnp
    >>> nm_unpack(nm_pack(jnp.array([[0.0], [5.0], [0.0], [0.0]]), "1:4")).ravel()
    Array([0., 5., 0., 0.], dtype=float32)
    """
    raw = packed.positions
    if is_concrete(raw):
        raw = np.asarray(raw)
        m = packed.pattern.m
        if raw.size and (raw.min() < 0 or raw.max() >= m):
            raise ValueError(f"nm_unpack: positions must lie in 0..{m - 1} for pattern "
                             f"{packed.pattern}, got {int(raw.min())}..{int(raw.max())} (an "
                             "edited or corrupt pack)")
    return _unpack(packed)


@jax.jit
def _unpack(packed: NMPacked) -> jax.Array:
    pattern, groups = packed.pattern, _packed_groups(packed.pattern)
    values = nm_groups(packed.values, groups)
    positions = nm_groups(packed.positions, groups).astype(jnp.int32)
    rows = jnp.arange(values.shape[0])[:, None]
    dense = jnp.zeros((values.shape[0], pattern.m), values.dtype).at[rows, positions].set(
        values, unique_indices=True)
    return nm_ungroup(dense, pattern, packed.shape)


@functools.partial(jax.jit, static_argnames=("precision", "product"))
def nm_matmul(x: jax.Array, packed: NMPacked, precision: Any = None,
              product: NMProduct = "gather") -> jax.Array:
    """``x @ kernel`` for a packed Dense kernel ``(in, out)`` grouped along its input
    axis; ``x`` is ``(..., in)``. ``product='gather'``: each output sums ``N / M`` of the
    inputs, gathered by position (the multiply-adds of the kept weights only; no dense
    kernel is formed). ``product='unpack'``: :func:`nm_unpack` inside the computation,
    then a dense product (the kernel is stored packed, computed dense).

    >>> import jax.numpy as jnp
    >>> kernel = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0]])
    >>> nm_matmul(jnp.array([[1.0, 10.0, 100.0, 1000.0]]), nm_pack(kernel, "2:4"))
    Array([[ 301., 4020.]], dtype=float32)
    """
    pattern = packed.pattern
    if len(packed.shape) != 2 or pattern.axis not in (0, -2):
        raise ValueError(f"nm_matmul takes a Dense kernel (in, out) grouped along its "
                         f"input axis, got shape {packed.shape} with pattern {pattern}")
    n_in = packed.shape[0]
    if jnp.shape(x)[-1] != n_in:
        raise ValueError(f"nm_matmul: x has {jnp.shape(x)[-1]} features, the kernel "
                         f"takes {n_in}")
    if product == "unpack":
        return jnp.matmul(x, nm_unpack(packed), precision=precision)
    if product != "gather":
        raise ValueError(f"product must be one of {NM_PRODUCTS}, got {product!r}")
    slot = jnp.arange(packed.values.shape[0], dtype=jnp.int32)
    index = (slot // pattern.n * pattern.m)[:, None] + packed.positions.astype(jnp.int32)
    gathered = jnp.take(x, index, axis=-1)  # (..., in * N / M, out)
    return jnp.einsum("...jo,jo->...o", gathered, packed.values, precision=precision)


def sparse_matmul(x: jax.Array, kernel: Any, precision: Any = None,
                  nm_product: NMProduct = "gather") -> jax.Array:
    """``x @ kernel`` over ``x``'s last axis for a dense, BCOO or :class:`NMPacked`
    kernel ``(in, out)`` (``nm_product``: how :func:`nm_matmul` multiplies)."""
    if isinstance(kernel, NMPacked):
        return nm_matmul(x, kernel, precision, nm_product)
    if _is_bcoo(kernel):
        from jax.experimental import sparse

        numbers = (((jnp.ndim(x) - 1,), (0,)), ((), ()))
        return sparse.bcoo_dot_general(x, kernel, dimension_numbers=numbers,
                                       precision=precision)
    return jnp.matmul(x, kernel, precision=precision)


def sparse_params(params: Any, masks: Any | None = None, form: str | Pattern = "bcoo",
                  prunable: Prunable = default_prunable) -> Any:
    """``params`` with every prunable 2-D leaf (a Dense kernel) in a sparse form:
    ``form='bcoo'`` (:func:`to_bcoo`, any mask) or an N:M pattern such as ``'2:4'``
    (:func:`nm_pack`; a kernel not in the pattern raises ``ValueError`` naming its path).
    ``masks`` (bool, the structure of ``params``; default: the non-zeros) say what is
    kept; other leaves (biases, norms, embeddings, conv kernels) stay dense, masked.
    Runs on the host.

    >>> import jax.numpy as jnp
    >>> params = {"fc": {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "bias": jnp.ones(2)}}
    >>> type(sparse_params(params)["fc"]["kernel"]).__name__
    'BCOO'
    """
    if masks is None:
        masks = jax.tree_util.tree_map(lambda p: jnp.asarray(p) != 0, params)
    check_same_structure(params, masks)
    nm = None if isinstance(form, str) and form.strip().lower() == "bcoo" else as_pattern(form)
    if nm is not None and not isinstance(nm, NM):
        raise ValueError(f"form must be 'bcoo' or an N:M pattern such as '2:4', got {form!r}")
    dense = apply_masks(params, masks)

    def convert(path: str, leaf: Any, mask: Any) -> Any:
        if not (prunable(path, leaf) and np.ndim(leaf) == 2):
            return leaf
        if nm is None:
            return to_bcoo(leaf, mask, where=path)
        return nm_pack(leaf, nm, mask, where=path)

    return map_with_path(convert, dense, masks)


def export_state(method: Any, state: Any, form: str | Pattern = "bcoo",
                 prunable: Prunable = default_prunable) -> Any:
    """:func:`sparse_params` of a method's state: its effective params under its hard
    masks (what evaluation and tickets use)."""
    masks = jax.device_get(method.hard_masks(state))
    return sparse_params(jax.device_get(method.params_with_masks(state, masks)), masks, form,
                         prunable)


def _is_bcoo(leaf: Any) -> bool:
    """Whether ``leaf`` is a BCOO matrix, without importing ``jax.experimental.sparse``
    (0.2 s): no leaf can be one before that module is imported."""
    module = sys.modules.get("jax.experimental.sparse")
    return module is not None and isinstance(leaf, module.BCOO)


def _is_sparse(leaf: Any) -> bool:
    return isinstance(leaf, NMPacked) or _is_bcoo(leaf)


def _sparse_dense(nm_product: NMProduct) -> Any:
    """A linen method interceptor: an ``nn.Dense`` whose kernel is sparse multiplies by
    the sparse form; every other call runs as it is."""

    def intercept(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if not is_dense_call(context):
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        if not _is_sparse(kernel):
            return next_fun(*args, **kwargs)
        x = dense_input(args, kwargs)
        dtype = module.dtype or jnp.result_type(x, kernel.dtype)
        y = sparse_matmul(jnp.asarray(x, dtype), kernel, module.precision, nm_product)
        y = y.astype(dtype)
        if module.use_bias:
            y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
        return y

    return intercept


def sparse_apply(model: nn.Module, variables: Any, *args: Any,
                 nm_product: NMProduct = "gather", **kwargs: Any) -> Any:
    """``model.apply(variables, *args, **kwargs)`` where ``variables['params']`` may hold
    sparse kernels (:func:`sparse_params`): each ``nn.Dense`` with one computes ``x @
    kernel + bias`` from the sparse form (:func:`sparse_matmul`; ``nm_product`` picks
    :func:`nm_matmul`'s product for packed kernels). Jit it like ``apply``.

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.harness.models import LeNet300
    >>> model = LeNet300(num_classes=3, hidden=(8,))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    >>> x = jnp.ones((2, 4))
    >>> out = sparse_apply(model, {"params": sparse_params(params, form="bcoo")}, x)
    >>> bool(jnp.allclose(out, model.apply({"params": params}, x), atol=1e-6))
    True
    """
    if nm_product not in NM_PRODUCTS:
        raise ValueError(f"nm_product must be one of {NM_PRODUCTS}, got {nm_product!r}")
    with nn.intercept_methods(_sparse_dense(nm_product)):
        return model.apply(variables, *args, **kwargs)
