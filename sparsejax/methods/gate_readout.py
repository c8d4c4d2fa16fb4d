"""What the gates' parameters say outside the training forward pass: the densities the
penalty and the controller read, and the hard binary masks of evaluation and export
(:func:`gate_masks`, ``method.hard_masks(state)`` of :func:`sparsejax.methods.gates.gates`).

A hard mask ``m`` (``effective_params = w * m``) is derived from the gate parameters by the
``binarize`` rule when it is asked for, never in a training step, which does not read it:

* ``'open'``: ``m = test gate > 0`` (default without a target sparsity);
* ``'half'``: ``m = test gate > 0.5``;
* ``'exact'`` (default with a target sparsity): exactly ``k = num_kept(1 - sparsity, N)``
  gates, those with the largest parameters (``mu`` or ``log_alpha``, which order the test
  gate and ``P(z > 0)`` alike) over all prunable leaves jointly (ties in leaf order, then
  row-major order). Since the test gate is monotone in its parameter, these are the gates
  open at test time by parameter and, when fewer than ``k`` are open, the closed gates
  closest to opening to fill up to ``k``: the mask's sparsity is the target by
  construction. (With the annealed noise of the tuned recipe the loss alone closes more
  gates than the target asks, and the controller, which can only close gates, does not
  act then; ``'topk'`` left the masks 0.4-12 points sparser than the target. Gates
  switched on only by this rule were closed in training, which costs accuracy, up to
  1.6 points at 50% on LeNet-300-100: ``lift_rate`` below opens them during training,
  so that the rule has next to nothing to fill; see experiments/gates_exact_sparsity.py.)
* ``'topk'``: of the gates open at test time, those with the largest parameters, at most
  ``k`` of them. A gate closed at test time is never switched on, so the mask's sparsity
  is the target or, when the controller closed more gates than needed, above it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.core.masks import prunable_leaves
from sparsejax.core.topk import topk_mask
from sparsejax.methods.base import SparseState
from sparsejax.methods.gate_forms import normal_cdf
from sparsejax.methods.gate_settings import GateSettings, noise_factor

__all__ = ["gate_leaves", "gate_mean", "prob_open", "expected_density", "open_density",
           "gate_masks"]

PyTree = Any


def _gated_flags(settings: GateSettings, params: PyTree) -> list[bool]:
    return jax.tree_util.tree_leaves(prunable_leaves(params, settings.prunable))


def gate_leaves(settings: GateSettings, params: PyTree, scores: PyTree) -> list[jax.Array]:
    """The gate parameters of the prunable leaves, in leaf order."""
    return [s for s, f in zip(jax.tree_util.tree_leaves(scores), _gated_flags(settings, params),
                              strict=True) if f]


def gate_mean(settings: GateSettings, params: PyTree, scores: PyTree,
              per_gate: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The mean of ``per_gate(g)`` over every gate parameter ``g`` (0 without gates).

    >>> import jax.numpy as jnp
    >>> from sparsejax.methods.gate_settings import gate_settings
    >>> params = {"w": jnp.ones((2,)), "b": jnp.ones((2,))}
    >>> scores = {"w": jnp.array([1.0, 3.0]), "b": jnp.zeros((0,))}  # "b" has no gates
    >>> settings = gate_settings(prunable=lambda path, leaf: path == "w")
    >>> float(gate_mean(settings, params, scores, jnp.square))
    5.0
    """
    leaves = gate_leaves(settings, params, scores)
    total = sum(int(s.size) for s in leaves)
    if total == 0:
        return jnp.float32(0.0)
    return sum(jnp.sum(per_gate(s)) for s in leaves) / total


def prob_open(settings: GateSettings, s: jax.Array, step: Any) -> jax.Array:
    """``P(z > 0)`` of gate parameters ``s`` at ``step`` (the noise scale of the step)."""
    if settings.sigma_final is None:
        return settings.form.prob_open(s)
    return normal_cdf(s / (settings.sigma * noise_factor(settings, step)))


def expected_density(settings: GateSettings, params: PyTree, scores: PyTree,
                     step: Any) -> jax.Array:
    """``mean P(z > 0)`` over every gate: the expected-L0 term of the penalty.

    >>> import jax.numpy as jnp
    >>> from sparsejax.methods.gate_settings import gate_settings
    >>> s = gate_settings(sigma=0.5)
    >>> w = {"w": jnp.ones((2, 2))}
    >>> round(float(expected_density(s, w, {"w": jnp.zeros((2, 2))}, 0)), 4)  # Phi(0)
    0.5
    """
    return gate_mean(settings, params, scores, lambda s: prob_open(settings, s, step))


def open_density(settings: GateSettings, params: PyTree, scores: PyTree) -> jax.Array:
    """The fraction of gates open at test time (test gate > 0), what the controller reads.

    >>> import jax.numpy as jnp
    >>> from sparsejax.methods.gate_settings import gate_settings
    >>> float(open_density(gate_settings(), {"w": jnp.ones((2, 2))},
    ...                    {"w": jnp.array([[-1.0, 0.2], [0.0, 3.0]])}))
    0.5
    """
    # 1.0 per open gate, summed in float32: exact up to 2**24 gates per leaf, and
    # twice as fast on CPU as an int32 sum of the booleans.
    return gate_mean(settings, params, scores,
                      lambda s: jnp.where(settings.form.test_gate(s) > 0, 1.0, 0.0))


def gate_masks(settings: GateSettings, state: SparseState) -> PyTree:
    """The binary masks of ``state``'s gate parameters by the ``binarize`` rule (all
    ``True`` on leaves without gates)."""
    form, binarize = settings.form, settings.binarize
    treedef = jax.tree_util.tree_structure(state.params)
    is_gated = _gated_flags(settings, state.params)
    score_leaves = jax.tree_util.tree_leaves(state.scores)
    if binarize in ("topk", "exact"):
        chosen = iter(topk_mask(
            [s for s, f in zip(score_leaves, is_gated, strict=True) if f], settings.density,
            scope="global", check_finite_scores=False))
    masks = []
    for leaf, s, f in zip(treedef.flatten_up_to(state.params), score_leaves, is_gated,
                          strict=True):
        if not f:
            masks.append(jnp.ones(jnp.shape(leaf), bool))
        elif binarize == "exact":
            masks.append(next(chosen))
        elif binarize == "topk":
            masks.append(next(chosen) & (form.test_gate(s) > 0))
        else:
            masks.append(form.test_gate(s) > (0.0 if binarize == "open" else 0.5))
    return jax.tree_util.tree_unflatten(treedef, masks)
