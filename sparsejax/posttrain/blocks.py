"""Block-by-block post-training pruning, as the reference code prunes a transformer
(locuslab/wanda ``lib/prune.py``, IST-DASLab/sparsegpt ``opt.py`` / ``llama.py``).

:func:`prune_blocks` runs the calibration set through the model once, up to the first
block, and keeps every argument that block is called with (hidden states, masks,
positions). Then, block after block, it prunes the block's Dense (linen) or Linear (NNX)
layers, and its einsum layers (``nn.Einsum``, ``nnx.Einsum``, as the matrix view of
:mod:`~sparsejax.posttrain.kernels`), from ``H = X^T X``
(:func:`~sparsejax.posttrain.pruners.prune_layer_hessian`) and
runs the pruned block on its inputs: its outputs are the next block's inputs. The forward
thus runs once in all, and each block twice (once for the Hessians, once for its
outputs; the last block once): time linear in depth, where
:func:`~sparsejax.posttrain.sequential.prune_sequential` re-runs the model from its input
for every group of layers. Memory: one block's inputs and outputs for the whole
calibration set, and the Hessians of one block (one per group of layers sharing an
input, as the reference's hooks hold them; ``within="sequential"``: one).

Blocks are named by their paths: a linen submodule path as in the params tree
(``"block1"``, ``"decoder/layers_0"``), or an NNX attribute path as ``nnx.state`` shows
it (``"blocks/0"``). Each block is called once per forward, in the order given, as
``x = block(x, *rest, **kwargs)``: its first argument is the previous block's output (or
that output's first element, for a block returning a tuple), and ``rest`` and ``kwargs``
are those the first block got, reused for every block as the reference code reuses the
attention mask and positions. Both are checked on a trace of the forward (nothing is
computed) before any pruning.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from sparsejax.core._tree import path_str
from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern
from sparsejax.posttrain.capture import (
    BlockCall,
    DenseCall,
    LayerPath,
    capture_calls,
    capture_linear_inputs,
    layer_calls,
    trace_blocks,
)
from sparsejax.posttrain.kernels import KernelLayout, prune_kernel
from sparsejax.posttrain.pruners import (
    PosttrainMethod,
    check_posttrain_method,
    input_hessian,
)
from sparsejax.posttrain.sequential import (
    LayerReport,
    calibration_batches,
    layer_patterns,
    rebuild_params,
)

__all__ = ["prune_blocks", "WITHIN"]

_ARRAYS = (jax.Array, np.ndarray)

WITHIN = ("block_inputs", "sequential")
"""How the layers inside a block are calibrated: on the dense block's inputs (the
references' default), or each group of layers on what the already pruned layers of the
block give it (IST's ``--true_sequential``)."""


class _Block(NamedTuple):
    """A block as the driver runs it alone: ``name`` (``'block1'``), ``fn`` (an unbound
    linen module, or the NNX ``GraphDef`` of the block: hashable, and equal for blocks
    of one configuration, so they share compiled programs), its layer calls (paths inside
    the block) and whether the next block takes its output's first element."""

    name: str
    fn: Any
    calls: tuple[DenseCall, ...]
    takes_first: bool


def prune_blocks(model: Any, params: Any, calibration_inputs: jax.Array, method: PosttrainMethod,
                 pattern: str | Pattern | Mapping[str, str | Pattern] = "unstructured",
                 sparsity: float | None = None, *, blocks: Sequence[str | Sequence[str]],
                 within: str = "block_inputs", model_state: Mapping[str, Any] | None = None,
                 batch_size: int | None = None, prunable: Prunable | None = None,
                 apply_kwargs: Mapping[str, Any] | None = None,
                 **options: Any) -> tuple[Any, list[LayerReport]]:
    """Prune the Dense/Linear and Einsum layers of the ``blocks`` of a linen model
    (``params``, and ``model_state`` such as batch statistics) or of an NNX model
    (``params=None``), block after block on cached activations. An einsum kernel is
    pruned as the matrix (contracted input axes, output axes), N:M groups along its
    flattened input features (:mod:`~sparsejax.posttrain.kernels`).

    ``within="block_inputs"`` (default, the references'): every layer of a block is
    calibrated on the inputs the dense block gives it (one forward of the block);
    ``"sequential"``: each layer, or group of layers sharing an input (query, key,
    value), on the inputs the already pruned layers of the block give it. Either way the
    next block gets the pruned block's outputs. Layers outside the blocks (the output
    head, the embeddings) stay dense, as in the reference code; ``prunable`` (default:
    every kernel of ``ndim >= 2`` inside the blocks) selecting a leaf outside them, a
    conv kernel, an einsum the matrix view cannot handle, or a kernel inside that no
    such layer calls, is a ``ValueError`` naming it.
    ``calibration_inputs`` are model inputs (examples first), run ``batch_size`` at a
    time (``None``: all at once); ``apply_kwargs`` go to the forward. ``pattern``: one
    for all, or a mapping from every layer name (``'block1/attn/query'``) to its own;
    ``options`` go to :func:`~sparsejax.posttrain.pruners.prune_layer_hessian` (SparseGPT:
    ``blocksize=128``, ``percdamp=0.01``, ``zero_dead_inputs=True`` by default, the
    reference's). Returns the pruned params (linen; the structure of ``params``) or a
    pruned copy of the NNX model, and one :class:`LayerReport` per layer in order.

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.harness.models.gpt import GPT
    >>> model = GPT(num_classes=7, n_layer=2, n_embd=8, n_head=2, context=4)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> tokens = jax.random.randint(jax.random.key(1), (6, 4), 0, 7)
    >>> pruned, report = prune_blocks(model, params, tokens, "sparsegpt", "2:4",
    ...                               blocks=["block1", "block2"])
    >>> len(report), report[-1].name, {r.density for r in report}
    (12, 'block2/fc2', {0.5})
    """
    if within not in WITHIN:
        raise ValueError(f"within must be one of {WITHIN}, got {within!r}")
    check_posttrain_method(method)
    batches = calibration_batches(calibration_inputs, batch_size)
    kwargs = dict(apply_kwargs or {})
    paths = _block_paths(blocks)
    if params is None:
        from flax import nnx

        if not isinstance(model, nnx.Module):
            raise ValueError("params=None is for an NNX model (it holds its weights); a linen "
                             "model needs its params")
        graphdef, variables = nnx.split(model)
        named = nnx.state(model, nnx.Param)
        modules = {tuple(str(k) for k in p): m for p, m in nnx.iter_graph(model)
                   if isinstance(m, nnx.Module)}
        fns = [nnx.split(modules[p])[0] if p in modules else None for p in paths]
        weights = [nnx.split(modules[p])[1] if p in modules else None for p in paths]
    else:
        if not isinstance(model, nn.Module):
            raise ValueError(f"a linen model takes its params; got a {type(model).__name__} "
                             "with params (an NNX model takes params=None)")
        graphdef, variables, named = None, {"params": params, **(model_state or {})}, params
        weights = [_subtree(variables, p) for p in paths]
        fns = [None] * len(paths)
    found = _trace(model, graphdef, variables, batches[0], kwargs, paths, fns, weights)
    chosen = _chosen_layers(named, found, prunable)
    leaves = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(named)[0]}
    names = [f"{b.name}/{'/'.join(c.path)}" for b, calls in zip(found, chosen, strict=True)
             for c in calls]
    layouts = {f"{b.name}/{'/'.join(c.path)}": c.layout for b, calls in zip(found, chosen,
               strict=True) for c in calls}
    shapes = {name: layouts[name].matrix_shape(np.shape(leaves[f"{name}/kernel"]))
              for name in names}
    patterns = layer_patterns(shapes, method, pattern, sparsity, options)

    inputs = [_first_inputs(model, graphdef, variables, batch, kwargs, paths[0])
              for batch in batches]
    pruned, report = {}, []
    prefix = "params/" if graphdef is None else ""
    for index, (block, calls) in enumerate(zip(found, chosen, strict=True)):
        block_weights, layers = _prune_block(block, weights[index], calls, inputs, prefix,
                                             patterns, method, sparsity, within, options)
        report += layers
        flat = {path_str(p): leaf for p, leaf in
                jax.tree_util.tree_flatten_with_path(block_weights)[0]}
        for call in calls:
            key = "/".join(call.path) + "/kernel"
            pruned[f"{block.name}/{key}"] = flat[prefix + key]
        if index + 1 < len(found):
            inputs = [(static, [_block_output(block.fn, static, block.takes_first,
                                              block_weights, dynamic), *dynamic[1:]])
                      for static, dynamic in inputs]
    if graphdef is None:
        return _replace(params, pruned), report
    return nnx.merge(graphdef, _replace(variables, pruned)), report


def _block_paths(blocks: Any) -> list[LayerPath]:
    """The block paths as tuples: non-empty, distinct, none inside another."""
    if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks:
        raise ValueError(f"blocks must be a non-empty list of submodule paths (e.g. "
                         f"['block1', 'block2']), got {blocks!r}")
    paths = [tuple(b.split("/")) if isinstance(b, str) else tuple(str(k) for k in b)
             for b in blocks]
    for i, a in enumerate(paths):
        for b in paths[:i]:
            if a[:len(b)] == b or b[:len(a)] == a:
                raise ValueError(f"blocks {'/'.join(b)} and {'/'.join(a)} overlap; name each "
                                 "block once, none inside another")
    return paths


def _subtree(variables: Mapping[str, Any], path: LayerPath) -> dict[str, Any] | None:
    """The collections of a linen block's variables at ``path`` (``None``: no params)."""
    found = {}
    for collection, tree in variables.items():
        for key in path:
            tree = tree.get(key) if isinstance(tree, Mapping) else None
        if tree is not None:
            found[collection] = tree
    return found if "params" in found else None


def _copy(tree: Any) -> Any:
    """New NNX ``Variable`` objects over the same arrays: a forward on a model merged from
    the copy cannot change the user's model."""
    return jax.tree.map(lambda x: x, tree)


def _first_inputs(model: Any, graphdef: Any, variables: Any, batch: jax.Array,
                  kwargs: dict[str, Any], path: LayerPath) -> tuple[Any, list[Any]]:
    """The first block's arguments on ``batch`` (static part, arrays): one forward,
    stopped there (NNX: on a copy of the model)."""
    if graphdef is not None:
        from flax import nnx

        model, variables = nnx.merge(graphdef, _copy(variables)), None
    call = trace_blocks(model, variables, (batch,), kwargs, [path], stop=True)[0][0]
    return _split(call.args, call.kwargs)


def _trace(model: Any, graphdef: Any, variables: Any, batch: jax.Array,
           kwargs: dict[str, Any], paths: list[LayerPath], fns: list[Any],
           weights: list[Any]) -> list[_Block]:
    """The blocks as the forward calls them (traced by ``jax.eval_shape``: nothing is
    computed), checked: every block exists, is called once, in order, on the previous
    block's output and with the first block's other arguments."""
    names = ["/".join(p) for p in paths]
    for name, weight in zip(names, weights, strict=True):
        if weight is None:
            raise ValueError(f"block {name} does not exist: no submodule with params at that "
                             "path (name blocks by their params path, e.g. 'block1', or "
                             "their NNX attribute path, e.g. 'blocks/0')")
    found: list[_Block] = []

    def run(variables: Any, batch: jax.Array) -> int:
        if graphdef is None:
            calls, _ = trace_blocks(model, variables, (batch,), kwargs, paths)
        else:
            from flax import nnx

            calls, _ = trace_blocks(nnx.merge(graphdef, variables), None, (batch,), kwargs,
                                    paths)
        found.extend(_check_calls(calls, paths, fns))
        return 0

    jax.eval_shape(run, variables, batch)
    return found


def _check_calls(calls: list[BlockCall], paths: list[LayerPath], fns: list[Any]) -> list[_Block]:
    names = ["/".join(p) for p in paths]
    order = [c.path for c in calls]
    for name, path in zip(names, paths, strict=True):
        if order.count(path) != 1:
            raise ValueError(f"block {name} is called {order.count(path)} times per forward; "
                             "prune_blocks needs each block called exactly once (a forward "
                             "compiled by nnx.jit calls no block: run it un-jitted)")
    if order != paths:
        raise ValueError(f"the forward calls the blocks in the order "
                         f"{['/'.join(p) for p in order]}, not {names}")
    first = calls[0]
    if not first.args or not isinstance(first.args[0], jax.Array):
        raise ValueError(f"block {names[0]} must take the hidden states as its first "
                         "positional argument (x = block(x, ...))")
    rest, tree = jax.tree.flatten((first.args[1:], first.kwargs))
    blocks = []
    for i, call in enumerate(calls):
        takes_first = False
        if i + 1 < len(calls):
            out, x = call.output, calls[i + 1].args[0] if calls[i + 1].args else None
            takes_first = isinstance(out, tuple) and bool(out) and x is out[0]
            if x is not out and not takes_first:
                raise ValueError(f"block {names[i + 1]} is not called on the output of block "
                                 f"{names[i]}: prune_blocks feeds each block the previous "
                                 "block's output as its first argument (x = block(x, ...))")
        others, other_tree = jax.tree.flatten((call.args[1:], call.kwargs))
        if other_tree != tree or not all(
                a is b or (not isinstance(a, _ARRAYS) and not isinstance(b, _ARRAYS)
                           and a == b) for a, b in zip(others, rest, strict=True)):
            raise ValueError(f"block {names[i]} gets other arguments than block {names[0]}; "
                             "prune_blocks reuses the first block's other arguments (masks, "
                             "positions) for every block, as the reference code does")
        fn = fns[i] if fns[i] is not None else call.module.clone(parent=None, name=None)
        blocks.append(_Block(names[i], fn, _layer_calls(names[i], call.layers), takes_first))
    return blocks


def _layer_calls(name: str, layers: list[tuple[LayerPath, Any, KernelLayout]],
                 ) -> tuple[DenseCall, ...]:
    """A block's layer calls with their shared-input groups (inputs compared by identity)."""
    paths = [path for path, _, _ in layers]
    for path in paths:
        if paths.count(path) > 1:
            raise ValueError(f"layer {name}/{'/'.join(path)} is called more than once per "
                             "forward (shared weights); prune_blocks supports one call per layer")
    return tuple(layer_calls(layers))


def _chosen_layers(named: Any, blocks: list[_Block],
                   prunable: Prunable | None) -> list[list[DenseCall]]:
    """Each block's prunable layer calls; ``ValueError`` for a prunable leaf outside the
    blocks or one that is no Dense/Linear kernel a block calls."""
    kernels = {f"{b.name}/{'/'.join(c.path)}/kernel": (i, c)
               for i, b in enumerate(blocks) for c in b.calls}
    chosen: list[list[DenseCall]] = [[] for _ in blocks]
    for path, leaf in jax.tree_util.tree_flatten_with_path(named)[0]:
        name = path_str(path)
        inside = any(name.startswith(b.name + "/") for b in blocks)
        if not (prunable(name, leaf) if prunable is not None
                else inside and default_prunable(name, leaf)):
            continue
        if name in kernels and kernels[name][1].layout.refused is not None:
            raise ValueError(f"{name} is prunable but is not the kernel of a layer prune_blocks "
                             f"can prune: {name[:-len('/kernel')]} "
                             f"{kernels[name][1].layout.refused}; leave it out of `prunable` "
                             "to keep it dense")
        if name in kernels:
            chosen[kernels[name][0]].append(kernels[name][1])
        elif inside:
            raise ValueError(f"{name} is prunable but is not the kernel of a Dense/Linear or "
                             "Einsum layer its block calls; post-training pruning supports "
                             "those kernels only (other layers are not supported yet)")
        else:
            raise ValueError(f"{name} is prunable but lies outside the blocks "
                             f"{[b.name for b in blocks]}: prune_blocks keeps every layer "
                             "outside the blocks dense (the head and the embeddings, as the "
                             "reference code does); leave it out of `prunable`, or prune it "
                             "with prune_sequential")
    return [[c for c in b.calls if c in chosen[i]] for i, b in enumerate(blocks)]


def _prune_block(block: _Block, weights: Any, calls: list[DenseCall], inputs: list[Any],
                 prefix: str, patterns: Mapping[str, Pattern], method: str,
                 sparsity: float | None, within: str,
                 options: Mapping[str, Any]) -> tuple[Any, list[LayerReport]]:
    """Prune one block's ``calls`` on ``inputs`` (per batch: the static and array parts of
    its arguments); returns its weights with the pruned kernels, and its reports."""
    flat = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(weights)[0]}
    groups = {c.group: [m for m in calls if m.group == c.group] for c in calls}
    leaders = tuple(members[0].path for members in groups.values())

    def hessians(paths: tuple[LayerPath, ...]) -> list[jax.Array]:
        current = rebuild_params(weights, flat)
        per_batch = [_block_hessians(block.fn, static, paths, current, dynamic)
                     for static, dynamic in inputs]
        return [sum(h[i] for h in per_batch) for i in range(len(paths))]

    dense = hessians(leaders) if within == "block_inputs" else None
    report = []
    for index, members in enumerate(groups.values()):
        hessian = dense[index] if dense is not None else hessians(leaders[index:index + 1])[0]
        for call in members:
            name = f"{block.name}/{'/'.join(call.path)}"
            key = prefix + "/".join(call.path) + "/kernel"
            flat[key], density, error = prune_kernel(method, flat[key], hessian, call.layout,
                                                     patterns[name], sparsity, name, **options)
            report.append(LayerReport(name, density, error))
    return rebuild_params(weights, flat), report


def _replace(tree: Any, pruned: Mapping[str, Any]) -> Any:
    """``tree`` with the leaves named in ``pruned`` replaced."""
    return jax.tree_util.tree_map_with_path(lambda p, x: pruned.get(path_str(p), x), tree)


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, list[Any]]:
    """A call's arguments as a hashable static part (structure and non-array values) and
    the list of its arrays (the hidden states first)."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    arrays = tuple(isinstance(leaf, _ARRAYS) for leaf in leaves)
    return ((tree, tuple(None if a else leaf for leaf, a in zip(leaves, arrays, strict=True)),
             arrays), [leaf for leaf, a in zip(leaves, arrays, strict=True) if a])


def _join(static: Any, dynamic: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    tree, constants, arrays = static
    values = iter(dynamic)
    return jax.tree.unflatten(tree, [next(values) if a else c
                                     for c, a in zip(constants, arrays, strict=True)])


def _run(fn: Any, weights: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
         layers: tuple[LayerPath, ...] | None = None) -> Any:
    """Run a block alone: its output, or (``layers``) the inputs of those layers."""
    if isinstance(fn, nn.Module):
        if layers is not None:
            return capture_calls(fn, weights, args, kwargs, layers, flatten=True)
        return fn.apply(weights, *args, **kwargs)
    from flax import nnx

    module = nnx.merge(fn, weights)
    if layers is not None:
        return capture_linear_inputs(module, *args, layers=layers, **kwargs)
    return module(*args, **kwargs)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_hessians(fn: Any, static: Any, layers: tuple[LayerPath, ...], weights: Any,
                    dynamic: list[Any]) -> list[jax.Array]:
    """``X^T X`` of each of ``layers`` in one forward of the block (stopped after the
    last of them)."""
    captured = _run(fn, weights, *_join(static, dynamic), layers=layers)
    return [input_hessian(captured[layer]) for layer in layers]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block_output(fn: Any, static: Any, takes_first: bool, weights: Any,
                  dynamic: list[Any]) -> jax.Array:
    """The block's output on its inputs: the next block's hidden states."""
    out = _run(fn, weights, *_join(static, dynamic))
    return out[0] if takes_first else out
