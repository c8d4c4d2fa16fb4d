"""Fixed inputs for the golden-mask test (tests/test_golden_masks.py): top-k calls and
method updates whose masks were recorded from the per-leaf engine before the top-k
search was batched over leaves (tests/golden/masks.json, written by
``python tests/golden_cases.py``). Every case is ``name -> (() -> masks pytree)``.

The top-k keeps exactly ``k`` entries with ties to the first ones, so any exact search
gives these masks bit for bit; a change of algorithm that alters one is a bug.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax
from sparsejax.core.topk import topk_mask, topk_mask_tracked
from sparsejax.core.topk_search import SAMPLE_SIZE

GOLDEN = Path(__file__).parent / "golden" / "masks.json"


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape) * scale


def _tree(seed):
    """Leaves of several sizes, some sharing a size: small (bitwise search) and large
    (sampled search), a conv kernel and a bias."""
    return {"a": _normal(seed, (64, 48)), "b": _normal(seed + 1, (64, 48)),
            "c": _normal(seed + 2, (20, 16)), "d": _normal(seed + 3, (300, 100)),
            "conv": _normal(seed + 4, (3, 3, 8, 16)), "e": _normal(seed + 5, (48, 64))}


def _ties(seed, shape, levels):
    return jnp.round(jax.random.uniform(jax.random.PRNGKey(seed), shape) * levels)


def topk_cases():
    cases = {}
    for seed in range(3):
        tree = _tree(seed)
        for density in (0.0, 0.05, 0.3, 0.5, 0.9, 1.0):
            cases[f"tree/s{seed}/d{density}"] = lambda t=tree, d=density: topk_mask(t, d)
            cases[f"tree/s{seed}/d{density}/global"] = (
                lambda t=tree, d=density: topk_mask(t, d, scope="global"))
            cases[f"tree/s{seed}/d{density}/abs"] = (
                lambda t=tree, d=density: topk_mask(t, d, by_magnitude=True))
        counts = {"a": 7, "b": 3000, "c": 319, "d": 1, "conv": 576, "e": 0}
        cases[f"tree/s{seed}/counts"] = lambda t=tree, c=counts: topk_mask(t, count=c)
        cases[f"tree/s{seed}/global_count"] = (
            lambda t=tree: topk_mask(t, count=12345, scope="global"))
        dens = {"a": 0.1, "b": 0.2, "c": 0.7, "d": 0.05, "conv": 0.5, "e": 0.33}
        cases[f"tree/s{seed}/per_leaf"] = lambda t=tree, d=dens: topk_mask(t, d)
    for levels in (1, 3, 50):
        for shape in ((40, 40), (300, 100), (7,)):
            x = _ties(levels, shape, levels)
            for density in (0.1, 0.5, 0.77):
                cases[f"ties/{levels}/{shape}/{density}"] = (
                    lambda x=x, d=density: topk_mask({"x": x, "y": -x}, d))
                cases[f"ties/{levels}/{shape}/{density}/global"] = (
                    lambda x=x, d=density: topk_mask({"x": x, "y": x}, d, scope="global"))
    masked = _normal(9, (200, 150))
    masked = jnp.where(jax.random.uniform(jax.random.PRNGKey(10), masked.shape) < 0.8,
                       -jnp.inf, masked)
    for count in (0, 10, 5999, 6000, 6001, 30000):
        cases[f"minus_inf/{count}"] = (
            lambda c=count: topk_mask(masked, count=c, check_finite_scores=False))
    spikes = jnp.zeros((256, 256)).at[0, :7].set(jnp.arange(7.0) + 1.0)
    for count in (3, 7, 8, 1000):
        cases[f"spikes/{count}"] = lambda c=count: topk_mask(spikes, count=c)
    tiny = jnp.array([1e-40, -1e-40, 0.0, -0.0, 1e-38, 2.0] * 500)
    cases["subnormals"] = lambda: topk_mask(tiny, 0.5)

    def tracked():
        tree, masks, cuts = _tree(5), [], None
        for step in range(4):
            moved = jax.tree_util.tree_map(lambda x, s=step: x + 1e-3 * s * jnp.sin(x), tree)
            m, cuts = topk_mask_tracked(moved, 0.3, cuts, sampled_above=SAMPLE_SIZE)
            masks.append(m)
        return masks

    cases["tracked"] = tracked
    return cases


def _mlp(seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"l0": {"kernel": jax.random.normal(k[0], (64, 48)) * 0.1, "bias": jnp.zeros(48)},
            "l1": {"kernel": jax.random.normal(k[1], (48, 48)) * 0.1, "bias": jnp.zeros(48)},
            "l2": {"kernel": jax.random.normal(k[2], (48, 48)) * 0.1, "bias": jnp.zeros(48)},
            "l3": {"kernel": jax.random.normal(k[3], (48, 16)) * 0.1, "bias": jnp.zeros(16)}}


def _grads(params, step):
    return jax.tree_util.tree_map(
        lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32) * (0.37 + step)
                          ).reshape(p.shape), params)


def method_cases():
    cases = {}
    options = {
        "set": dict(sparsity=0.8, update_every=1),
        "rigl": dict(sparsity=0.8, update_every=1, end_step=100),
        "snfs": dict(sparsity=0.8, update_every=1, total_steps=100),
        "rigl/2:4": dict(sparsity=0.5, update_every=1, end_step=100, pattern="2:4"),
        "rigl/block:4": dict(sparsity=0.75, update_every=1, end_step=100, pattern="block:4"),
        "set/channel": dict(sparsity=0.5, update_every=1, pattern="channel"),
        "static": dict(sparsity=0.9),
        "magnitude": dict(sparsity=0.9),
        "gradual_magnitude": dict(sparsity=0.9, total_steps=4, end_step=4, frequency=1),
    }
    for label, opts in options.items():
        name = label.split("/")[0]

        def run(name=name, opts=opts):
            tx = sparsejax.sparse_tx(name, optax.sgd(0.1, momentum=0.9), **opts)
            params = _mlp(0)
            state = tx.init(params)
            params = sparsejax.zero_pruned(params, state)
            masks = [sparsejax.masks_of(state)]
            update = jax.jit(tx.update)
            for step in range(4):
                updates, state = update(_grads(params, step), state, params)
                params = optax.apply_updates(params, updates)
                masks.append(sparsejax.masks_of(state))
            return masks

        cases[f"method/{label}"] = run

    def edge_popup():
        method = sparsejax.get_method("edge_popup", optax.sgd(0.1, momentum=0.9), sparsity=0.5)
        state = method.init(_mlp(1), jax.random.PRNGKey(0))
        masks = [jax.tree_util.tree_map(lambda p: p != 0, method.effective_params(state))]
        update = jax.jit(method.update)
        for step in range(3):
            grads = _grads(method.trainables(state), step)
            state = update(state, grads)
            masks.append(jax.tree_util.tree_map(lambda p: p != 0, method.effective_params(state)))
        return masks

    cases["method/edge_popup"] = edge_popup
    return cases


def all_cases():
    return {**topk_cases(), **method_cases()}


def digest(masks) -> str:
    """sha256 of the masks' leaves (as booleans, packed, with their shapes), in leaf order."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(masks):
        leaf = np.asarray(leaf) != 0
        h.update(str(leaf.shape).encode())
        h.update(np.packbits(leaf.ravel()).tobytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    recorded = {name: digest(call()) for name, call in all_cases().items()}
    GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(len(recorded), "cases recorded in", GOLDEN)
