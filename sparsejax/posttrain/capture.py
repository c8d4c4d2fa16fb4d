"""Capture the inputs of a Flax model's linear layers, for post-training pruning.

:func:`capture_dense_inputs` runs a linen model under :func:`flax.linen.intercept_methods`
and returns, for every ``nn.Dense`` (and ``nn.Einsum``) it calls, the input that layer
saw, flattened to ``(tokens, in)`` and keyed by the layer's params path (e.g.
``('block1', 'attn', 'query')``), in call order. An einsum layer's input is flattened to
the rows of its kernel's matrix view (:class:`~sparsejax.posttrain.kernels.KernelLayout`:
token axes first, the contracted axes last); a conv layer, or an einsum that view
cannot handle, is skipped, or a ``ValueError`` when asked for by ``layers``. It is
traceable (no host round trip), so it runs under ``jax.jit`` and ``jax.eval_shape``.
:func:`dense_calls` lists the layers, their input sizes and which ones share one input
(query, key and value do) without computing anything. :func:`capture_linear_inputs` is
the NNX counterpart for ``nnx.Linear`` and ``nnx.Einsum``. :func:`trace_blocks` records
the calls of named blocks (submodules), linen or NNX, and the layers each one calls: what
the block-by-block driver needs.

>>> import jax, jax.numpy as jnp
>>> from sparsejax.harness.models.mlp import MLP
>>> model = MLP(num_classes=3, hidden=(4,))
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 3)))
>>> inputs = capture_dense_inputs(model, variables, jnp.ones((5, 2, 3)))
>>> [(path, x.shape) for path, x in inputs.items()]
[(('fc1',), (5, 6)), (('head',), (5, 4))]
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax

from sparsejax.posttrain.kernels import DENSE, KernelLayout, layer_layout, nnx_layer_classes

if TYPE_CHECKING:  # imported where used: `import sparsejax` does not import flax.nnx
    from flax import nnx

__all__ = ["LayerPath", "DenseCall", "capture_calls", "capture_dense_inputs", "dense_calls",
           "capture_linear_inputs", "dense_input", "BlockCall", "trace_blocks"]

LayerPath = tuple[str, ...]
"""A Dense layer's path in the params tree, e.g. ``('block1', 'attn', 'query')``; its
kernel is the leaf ``path + ('kernel',)``."""


class DenseCall(NamedTuple):
    """One linear layer as the forward calls it: its params ``path``, its input size
    ``in`` (of its kernel's matrix view), ``group``, the index of the first layer (in call
    order) that got the very same input array flattened the same way (``query``, ``key``
    and ``value`` share one), and its kernel's ``layout`` (:data:`DENSE` for a Dense)."""

    path: LayerPath
    features_in: int
    group: int
    layout: KernelLayout = DENSE


def is_dense_call(context: Any) -> bool:
    """Whether a ``flax.linen.intercept_methods`` context is an ``nn.Dense`` being called."""
    return isinstance(context.module, nn.Dense) and context.method_name == "__call__"


def dense_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input ``x`` of a call ``layer(*args, **kwargs)`` to ``nn.Dense`` or
    ``nnx.Linear``: the first positional argument, or the keyword ``inputs`` (their
    ``__call__(self, inputs)``). ``ValueError`` when neither is given.

    >>> dense_input((1,), {}), dense_input((), {"inputs": 2})
    (1, 2)
    """
    if args:
        return args[0]
    if "inputs" in kwargs:
        return kwargs["inputs"]
    raise ValueError(f"a Dense/Linear call without its input (no positional argument and no "
                     f"'inputs=' keyword; got keywords {sorted(kwargs)})")


class _Stop(Exception):
    """Raised by the interceptor once the last layer asked for is captured: the rest of
    the forward is not needed."""


def linen_layer(context: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                ) -> KernelLayout | None:
    """The layout of a ``flax.linen.intercept_methods`` context calling a layer with a
    kernel (Dense, Einsum, Conv), ``None`` for any other call."""
    if context.method_name != "__call__":
        return None
    return layer_layout(context.module, args, kwargs)


@contextlib.contextmanager
def _intercept(record: Callable[[LayerPath, Any, KernelLayout], None]) -> Iterator[None]:
    def interceptor(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    context: Any) -> Any:
        layout = linen_layer(context, args, kwargs)
        if layout is not None:
            record(tuple(str(name) for name in context.module.path), dense_input(args, kwargs),
                   layout)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _recorder(layers: Collection[LayerPath] | None, flatten: bool,
              ) -> tuple[dict[LayerPath, Any], dict[LayerPath, KernelLayout],
                         Callable[[LayerPath, Any, KernelLayout], None]]:
    """The inputs captured (flattened by their layout, or raw), every layer's layout (a
    refused one too, its input not captured), and the function recording a call."""
    captured: dict[LayerPath, Any] = {}
    layouts: dict[LayerPath, KernelLayout] = {}
    wanted = None if layers is None else {tuple(layer) for layer in layers}

    def record(path: LayerPath, x: Any, layout: KernelLayout) -> None:
        if wanted is not None and path not in wanted:
            return
        if layout.refused is not None:
            if wanted is not None:
                layout.check("/".join(path))
            layouts.setdefault(path, layout)
            return
        if path in captured:
            raise ValueError(f"Dense layer {'/'.join(path)} is called more than once per "
                             "forward (shared weights); capture supports one call per layer")
        layouts[path] = layout
        captured[path] = layout.inputs(x) if flatten else x
        if wanted is not None and len(captured) == len(wanted):
            raise _Stop

    return captured, layouts, record


def _check_found(captured: dict[LayerPath, Any], layers: Collection[LayerPath] | None,
                 kind: str) -> None:
    missing = set() if layers is None else {tuple(layer) for layer in layers} - set(captured)
    if missing:
        raise ValueError(f"the forward called no {kind} at "
                         f"{', '.join(sorted('/'.join(map(str, p)) for p in missing))}")


def capture_calls(model: nn.Module, variables: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any], layers: Collection[LayerPath] | None,
                  flatten: bool) -> dict[LayerPath, Any]:
    """The inputs of the Dense calls of ``model.apply(variables, *args, **kwargs)``, by
    layer path (``layers``: only those, and the forward stops after the last; ``None``:
    all); ``flatten`` rows them as ``(examples, in)``. ``ValueError`` names a layer of
    ``layers`` the forward never called."""
    return _capture(model, variables, args, kwargs, layers, flatten)[0]


def _capture(model: nn.Module, variables: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             layers: Collection[LayerPath] | None, flatten: bool,
             ) -> tuple[dict[LayerPath, Any], dict[LayerPath, KernelLayout]]:
    captured, layouts, record = _recorder(layers, flatten)
    try:
        with _intercept(record):
            model.apply(variables, *args, **kwargs)
    except _Stop:
        pass
    _check_found(captured, layers, "Dense layer")
    return captured, layouts


def capture_dense_inputs(model: nn.Module, variables: Any, *args: Any,
                         layers: Collection[LayerPath] | None = None,
                         **kwargs: Any) -> dict[LayerPath, jax.Array]:
    """The input of every ``nn.Dense`` (and ``nn.Einsum``) that ``model.apply(variables,
    *args, **kwargs)`` calls, as ``(tokens, in)`` (all leading axes flattened; an einsum's
    input as the rows of its kernel's matrix view), keyed by the layer's params path, in
    call order. ``layers``: only these paths (the forward stops after the last
    of them). Traceable: wrap it in ``jax.jit`` with ``model`` static. ``ValueError`` for
    a layer called twice per forward, or a path in ``layers`` that is never called."""
    return capture_calls(model, variables, args, kwargs, layers, flatten=True)


def dense_calls(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> list[DenseCall]:
    """The Dense and Einsum layers (and, refused, Conv layers: ``features_in=0``)
    ``model.apply(variables, *args, **kwargs)`` calls, in call order, with their input
    sizes, shared-input groups and kernel layouts (traced with ``jax.eval_shape``:
    nothing is computed).

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.harness.models.gpt import GPT
    >>> model = GPT(num_classes=5, n_layer=1, n_embd=8, n_head=2, context=4)
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> [("/".join(c.path), c.group) for c in dense_calls(model, variables, jnp.zeros((1, 4)))]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('block1/attn/query', 0), ('block1/attn/key', 0), ('block1/attn/value', 0),
     ('block1/attn/out', 3), ('block1/fc1', 4), ('block1/fc2', 5), ('head', 6)]
    """
    calls: list[DenseCall] = []

    def trace(variables: Any, args: tuple[Any, ...]) -> int:
        captured, layouts = _capture(model, variables, args, kwargs, None, flatten=False)
        calls.extend(layer_calls([(path, captured.get(path), layout)
                                  for path, layout in layouts.items()]))
        return 0

    jax.eval_shape(trace, variables, args)
    return calls


def layer_calls(layers: list[tuple[LayerPath, Any, KernelLayout]]) -> list[DenseCall]:
    """Recorded ``(path, input, layout)`` calls as :class:`DenseCall` s: layers that get
    the same input array (by identity) flattened the same way share a group; a refused
    layer (no input) has its own group and ``features_in=0``."""
    calls: list[DenseCall] = []
    seen: list[tuple[Any, tuple[int, ...]]] = []
    for path, x, layout in layers:
        if layout.refused is not None:
            calls.append(DenseCall(path, 0, len(seen), layout))
            seen.append((None, ()))
            continue
        key = (x, layout.input_perm(x.ndim))
        group = next((i for i, (other, perm) in enumerate(seen)
                      if other is x and perm == key[1]), len(seen))
        seen.append(key)
        calls.append(DenseCall(path, layout.features_in(x.shape), group, layout))
    return calls


def capture_linear_inputs(model: nnx.Module, *args: Any,
                          layers: Collection[LayerPath] | None = None,
                          **kwargs: Any) -> dict[LayerPath, jax.Array]:
    """The NNX counterpart of :func:`capture_dense_inputs`: the input of every
    ``nnx.Linear`` or ``nnx.Einsum`` (or subclass that keeps its ``__call__``) that
    ``model(*args, **kwargs)`` calls, as ``(tokens, in)``, keyed by the module's path in
    ``model`` (its kernel is ``nnx.state(model)`` at ``path + ('kernel',)``), in call
    order. The ``__call__`` of those classes (and of ``nnx.Conv``, to refuse it by name)
    is wrapped for the duration of the call (not thread-safe).

    The forward must run its Linear layers un-jitted, in the trace the capture is called
    in: a forward compiled with ``nnx.jit`` calls copies of the layers while tracing and
    no ``__call__`` at all once cached, and a layer called under an inner ``jax.jit``
    (or another transform) would hand back a tracer of that trace (a leak). Both are a
    ``ValueError`` (so is a forward that calls no ``nnx.Linear`` of ``model``); jit the
    whole capture instead.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.fc1, self.fc2 = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.fc2(nnx.relu(self.fc1(x)))
    >>> inputs = capture_linear_inputs(Net(nnx.Rngs(0)), jnp.ones((2, 5, 3)))
    >>> [(path, x.shape) for path, x in inputs.items()]
    [(('fc1',), (10, 3)), (('fc2',), (10, 4))]
    """
    from flax import nnx
    from flax.nnx.tracers import TraceState

    classes = nnx_layer_classes()
    paths = {id(module): tuple(str(key) for key in path)
             for path, module in nnx.iter_graph(model) if isinstance(module, classes)}
    captured, _, record = _recorder(layers, flatten=True)
    originals = {cls: cls.__call__ for cls in classes}
    trace = TraceState()  # the trace the capture runs in
    called: list[LayerPath] = []  # the model's layers called, captured or not

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: nnx.Module, *args: Any, **kwargs: Any) -> jax.Array:
            layout = layer_layout(self, args, kwargs) if id(self) in paths else None
            if layout is not None:
                if not trace.is_valid():
                    raise ValueError(
                        f"{type(self).__name__} {'/'.join(paths[id(self)])} is called inside a "
                        "transform of the forward (nnx.jit, nnx.vmap, ...): its input would "
                        "be a leaked tracer; run the forward un-jitted (jit the capture "
                        "instead)")
                called.append(paths[id(self)])
                record(paths[id(self)], dense_input(args, kwargs), layout)
            return original(self, *args, **kwargs)
        return call

    for cls, original in originals.items():
        cls.__call__ = wrap(original)  # type: ignore[method-assign]
    try:
        model(*args, **kwargs)
    except _Stop:
        pass
    finally:
        for cls, original in originals.items():
            cls.__call__ = original  # type: ignore[method-assign]
    if paths and not called:
        raise ValueError("the forward called no nnx.Linear of the model (a forward compiled "
                         "with nnx.jit and cached skips the capture); run the forward "
                         "un-jitted (jit the capture instead)")
    _check_found(captured, layers, "nnx.Linear/Einsum")
    return captured


@dataclasses.dataclass
class BlockCall:
    """One call of a named block (a submodule) by the forward: its ``path``, the
    ``module`` called (linen: bound, NNX: the module), the ``args`` and ``kwargs`` it got,
    its ``output`` (``None`` when the forward stopped at it) and the layers with a kernel
    it called (Dense/Linear, Einsum, Conv), as ``(path inside the block, input, layout)``
    in call order."""

    path: LayerPath
    module: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    layers: list[tuple[LayerPath, Any, KernelLayout]] = dataclasses.field(default_factory=list)


def trace_blocks(model: Any, variables: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 blocks: Collection[LayerPath], stop: bool = False,
                 ) -> tuple[list[BlockCall], list[LayerPath]]:
    """Run the forward (linen: ``model.apply(variables, *args, **kwargs)``; NNX, with
    ``variables=None``: ``model(*args, **kwargs)``) recording every call of a block
    (``__call__`` of the submodule at one of the paths ``blocks``) and every call of a
    layer with a kernel (:func:`~sparsejax.posttrain.kernels.layer_layout`): inside a
    block's call, as that block's layer; outside, in the second list
    returned. ``stop``: the forward ends at the first block call (its inputs recorded).
    ``ValueError`` for a block path that names no submodule (NNX) or a layer called
    inside a block that is none of its submodules."""
    calls: list[BlockCall] = []
    outside: list[LayerPath] = []
    running: list[BlockCall] = []  # the block whose call is in progress
    wanted = {tuple(b) for b in blocks}

    def on_layer(path: LayerPath, x: Any, layout: KernelLayout) -> None:
        if not running:
            outside.append(path)
            return
        block = running[-1]
        if path[:len(block.path)] != block.path:
            raise ValueError(f"layer {'/'.join(path)} is called inside block "
                             f"{'/'.join(block.path)} but is not one of its submodules")
        block.layers.append((path[len(block.path):], x, layout))

    def on_block(path: LayerPath, module: Any, call: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        calls.append(BlockCall(path, module, args, kwargs))
        if stop:
            raise _Stop
        running.append(calls[-1])
        try:
            calls[-1].output = call(*args, **kwargs)
        finally:
            running.pop()
        return calls[-1].output

    try:
        if variables is None:
            _trace_nnx(model, args, kwargs, wanted, on_layer, on_block)
        else:
            def interceptor(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                            context: Any) -> Any:
                path = tuple(str(name) for name in context.module.path)
                layout = linen_layer(context, args, kwargs)
                if layout is not None:
                    on_layer(path, dense_input(args, kwargs), layout)
                elif context.method_name == "__call__" and path in wanted and not running:
                    return on_block(path, context.module, next_fun, args, kwargs)
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(interceptor):
                model.apply(variables, *args, **kwargs)
    except _Stop:
        pass
    return calls, outside


def _trace_nnx(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
               wanted: set[LayerPath], on_layer: Callable[..., None],
               on_block: Callable[..., Any]) -> None:
    """:func:`trace_blocks` of an NNX model: ``__call__`` of the layer classes
    (``nnx.Linear``, ``nnx.Einsum``, ``nnx.Conv``) and of the blocks' classes is wrapped
    for the duration of the forward."""
    from flax import nnx

    modules = {tuple(str(key) for key in path): module
               for path, module in nnx.iter_graph(model) if isinstance(module, nnx.Module)}
    for path in wanted:
        if path not in modules:
            raise ValueError(f"no submodule at {'/'.join(path)} in the NNX model")
    blocks = {id(modules[path]): path for path in wanted}
    classes = nnx_layer_classes()
    linears = {id(m): path for path, m in modules.items() if isinstance(m, classes)}
    running: set[int] = set()  # a subclass's __call__ calling its parent's: one call
    saved = {}

    def wrap(cls: type, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            key = id(self)
            if key in running or (key not in blocks and key not in linears):
                return original(self, *args, **kwargs)
            running.add(key)
            try:
                layout = layer_layout(self, args, kwargs) if key in linears else None
                if layout is not None:
                    on_layer(linears[key], dense_input(args, kwargs), layout)
                if key in blocks:
                    return on_block(blocks[key], self,
                                    lambda *a, **k: original(self, *a, **k), args, kwargs)
                return original(self, *args, **kwargs)
            finally:
                running.discard(key)
        return call

    for cls in set(classes) | {type(modules[path]) for path in wanted}:
        saved[cls] = cls.__dict__.get("__call__")
        cls.__call__ = wrap(cls, cls.__call__)  # type: ignore[method-assign]
    try:
        model(*args, **kwargs)
    finally:
        for cls, original in saved.items():
            if original is None:
                del cls.__call__
            else:
                cls.__call__ = original  # type: ignore[method-assign]
