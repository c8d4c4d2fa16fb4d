"""SynFlow (Tanaka et al. 2020): pruning at init without data, by iterative synaptic flow.

Round ``k`` of ``iterations`` scores the weights by the synaptic flow of the network with
``|w|`` weights on an all-ones input and keeps ``density ** (k / iterations)`` (an
exponential schedule), pruned weights excluded; the rounds run in one compiled loop whose
masks come from :func:`~sparsejax.methods.pruning_tables.schedule_table`, so every round
obeys the ``pattern``. The survivors then train under the fixed mask
(:func:`sparsejax.fixed_mask`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sparsejax.core.masks import Prunable, default_prunable
from sparsejax.core.patterns import Pattern, as_pattern, method_pattern, pattern_density
from sparsejax.core.validation import check_sparsity
from sparsejax.methods.base import (
    InitContext,
    Method,
    named_error,
)
from sparsejax.methods.fixed import (
    fixed_mask,
)
from sparsejax.methods.pruning_scores import (
    ApplyFn,
    exclude_pruned,
    synflow_scores,
)
from sparsejax.methods.pruning_tables import schedule_table
from sparsejax.methods.registry import register_method

__all__ = ["synflow", "synflow_masks"]

PyTree = Any


def synflow_masks(
    apply_fn: ApplyFn, params: PyTree, model_state: PyTree, input_shape: tuple[int, ...],
    density: float | None, distribution: str = "global", *, iterations: int = 100,
    pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable, overrides: Mapping[str, float] | None = None,
) -> PyTree:
    """Iterative SynFlow: ``iterations`` rounds of scoring and pruning, round ``k`` keeping
    ``density ** (k / iterations)`` (an exponential schedule), pruned weights excluded.

    With a structured ``pattern`` every round's mask obeys it
    (:func:`~sparsejax.methods.pruning_tables.masks_for_densities`): ``block:B``
    and ``channel`` rounds keep whole blocks or output channels, ranked by the sum of
    their SynFlow scores, each layer at the density the distribution gives it (not
    ``'global'``). ``N:M`` fixes the density at ``N / M`` (``density`` may be ``None``)
    and the schedule runs inside the groups: round ``k`` keeps
    ``num_kept(density ** (k / iterations), M)`` of every group of ``M``, so the masks
    step through ``M-1:M``, ..., ``N:M`` as the exponential schedule passes those
    densities, and the last round holds exactly ``N`` per group. Each group is a
    separate top-k, so weights compete within their group only, as the pattern forces
    in the end; rounds that would keep the count of the round before change nothing and
    are skipped (at most ``M - N + 1`` rounds are scored).

    >>> import jax.numpy as jnp
    >>> f = lambda p, s, x: x @ p["a"] @ p["b"]
    >>> p = {"a": jnp.array([[2.0, -1.0]]), "b": jnp.array([[3.0], [4.0]])}
    >>> m = synflow_masks(f, p, {}, (1,), 0.5, iterations=4)
    >>> int(m["a"].sum() + m["b"].sum())
    2
    >>> m = synflow_masks(f, p, {}, (1,), None, iterations=4, pattern="1:2",
    ...                   overrides={"a": 1.0})  # a dense; b keeps 1 of its 2 inputs:
    >>> m["b"].ravel().astype(int), m["a"].ravel().astype(int)  # the flow 2*3 > 1*4
    (Array([1, 0], dtype=int32), Array([1, 1], dtype=int32))
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    pattern = as_pattern(pattern)
    try:
        density = pattern_density(pattern, density)
    except ValueError as error:
        raise named_error("synflow", error) from None
    schedule = [density ** (k / iterations) for k in range(1, iterations + 1)]
    try:
        table = schedule_table(params, schedule, distribution, pattern, prunable, overrides)
    except ValueError as error:
        raise named_error("synflow", error) from None
    if not pattern.ranks_globally:  # a repeated row of unit counts keeps the mask it is given
        table = table.distinct()
    rounds = _synflow_rounds
    try:
        hash(apply_fn)
    except TypeError:  # an unhashable apply_fn cannot key the compiled rounds
        rounds = _synflow_rounds.__wrapped__
    return rounds(apply_fn, params, model_state, tuple(input_shape), table)


@functools.partial(jax.jit, static_argnames=("apply_fn", "input_shape", "table"))
def _synflow_rounds(apply_fn: ApplyFn, params: PyTree, model_state: PyTree,
                    input_shape: tuple[int, ...], table: Any
                    ) -> PyTree:
    """The rounds of :func:`synflow_masks`, compiled once per ``apply_fn``, shapes and
    counts (an eager loop over a fresh closure would compile again on every call)."""
    masks0 = jax.tree_util.tree_map(lambda p: jnp.ones(jnp.shape(p), bool), params)

    def body(k: jax.Array, masks: PyTree) -> PyTree:
        scores = synflow_scores(apply_fn, params, model_state, input_shape, masks)
        return table.select(exclude_pruned(scores, masks), k)

    return lax.fori_loop(0, len(table.counts), body, masks0)



def synflow(
    optimizer: optax.GradientTransformation, *, sparsity: float, distribution: str = "global",
    iterations: int = 100, apply_fn: ApplyFn | None = None,
    input_shape: Sequence[int] | None = None, pattern: str | Pattern = "unstructured",
    prunable: Prunable = default_prunable, overrides: Mapping[str, float] | None = None,
) -> Method:
    """SynFlow (Tanaka et al. 2020): data-free iterative pruning at init
    (:func:`synflow_masks`), then training the survivors. Needs ``apply_fn`` (the harness
    gives it) and the input shape of one example (``input_shape``, else read off the first
    batch of the init context). With a ``pattern`` every round's mask obeys it (see
    :func:`synflow_masks`).

    >>> import jax, jax.numpy as jnp, optax
    >>> f = lambda p, s, x: x @ p["a"] @ p["b"]
    >>> m = synflow(optax.sgd(0.1), sparsity=0.5, iterations=2, apply_fn=f, input_shape=(1,))
    >>> s = m.init({"a": jnp.array([[2.0, -1.0]]), "b": jnp.array([[3.0], [4.0]])},
    ...            jax.random.PRNGKey(0))
    >>> int(s.masks["a"].sum() + s.masks["b"].sum())
    2
    """
    check_sparsity(sparsity)
    pattern = method_pattern(pattern, sparsity, "synflow")
    if apply_fn is None:
        raise ValueError("synflow needs apply_fn(params, model_state, inputs) -> outputs")

    def make_masks(params: PyTree, rng: jax.Array, model_state: PyTree,
                   context: InitContext | None) -> PyTree:
        shape = input_shape
        if shape is None:
            if context is None or not context.batches:
                raise ValueError("synflow needs input_shape or an init context with a batch")
            shape = np.shape(context.batches[0]["image"])[1:]
        return synflow_masks(apply_fn, params, model_state, tuple(shape), 1.0 - sparsity,
                             distribution, iterations=iterations, pattern=pattern,
                             prunable=prunable, overrides=overrides)

    return fixed_mask(optimizer, make_masks, "synflow")


register_method("synflow", synflow)
