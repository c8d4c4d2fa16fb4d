"""A second eager call with the same shapes, dtypes and options compiles nothing.

Called eagerly, a function whose loops and branches (``lax.while_loop``, ``fori_loop``,
``cond``) are built from fresh Python closures traces and compiles them again on every
call: a second ``topk_mask`` of a 300x100 leaf took seconds, as did a second
``static(...).init`` of a small MLP. The library compiles such cores at module level
(``jax.jit``, hashable options static, counts traced), so a later call, also through a
freshly built ``Method``, reuses the first call's programs. Each test warms a call up,
then counts the XLA compilations of the next one.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from toy_mlp import mlp_params

import sparsejax
from sparsejax.core.topk import kth_largest, topk_mask, topk_mask_tracked
from sparsejax.core.topk_search import SAMPLE_SIZE

try:
    from jax._src.dispatch import BACKEND_COMPILE_EVENT
except ImportError:  # pragma: no cover - the event's name in jax 0.4-0.10
    BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_COMPILED = [0]


def _count_compilation(event, duration, **kwargs):
    if event == BACKEND_COMPILE_EVENT:
        _COMPILED[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def compiles(call):
    """How many XLA programs are compiled while ``call()`` runs to its result."""
    before = _COMPILED[0]
    jax.block_until_ready(call())
    return _COMPILED[0] - before


def second_call_compiles(call):
    compiles(call)  # the first call may compile (unless an earlier test did)
    return compiles(call)


def wide_leaf(seed=0):
    """30,000 scores: above 2048, so the sampled search (a while loop) where a tracked
    top-k is given ``sampled_above=SAMPLE_SIZE``."""
    return jax.random.normal(jax.random.PRNGKey(seed), (300, 100))


def test_the_counter_sees_compilations():
    x = jnp.ones(3)
    assert compiles(lambda: jax.jit(lambda x: x * 3)(x)) == 1  # a new function: compiled


@pytest.mark.parametrize("options", [
    {"density": 0.3},
    {"count": 1234},
    {"density": 0.3, "by_magnitude": True},
    {"density": 0.3, "check_finite_scores": False},
], ids=["density", "count", "by_magnitude", "unchecked"])
def test_topk_mask_of_a_leaf(options):
    x = wide_leaf()
    assert second_call_compiles(lambda: topk_mask(x, **options)) == 0
    other = wide_leaf(1)  # other scores of the same shape reuse the program
    assert compiles(lambda: topk_mask(other, **options)) == 0


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_topk_mask_of_a_tree(scope):
    tree = {"wide": wide_leaf(), **mlp_params(jax.random.PRNGKey(0))}
    assert second_call_compiles(lambda: topk_mask(tree, 0.2, scope=scope)) == 0
    assert compiles(lambda: topk_mask(tree, count=3, scope=scope)) == 0


def test_other_densities_and_counts_reuse_the_program():
    x = wide_leaf()
    topk_mask(x, 0.3)
    assert compiles(lambda: topk_mask(x, 0.05)) == 0  # the count is traced, not static
    assert compiles(lambda: topk_mask(x, count=10)) == 0
    tree = mlp_params(jax.random.PRNGKey(0))
    topk_mask(tree, 0.5)
    densities = {"Dense_0": {"kernel": 0.1, "bias": 1.0}, "Dense_1": {"kernel": 0.7, "bias": 0.0}}
    assert compiles(lambda: topk_mask(tree, densities)) == 0


def test_topk_mask_tracked():
    x = wide_leaf()
    for sampled_above in (None, SAMPLE_SIZE):  # bitwise and sampled
        _, cuts = topk_mask_tracked(x, 0.3, sampled_above=sampled_above)
        assert compiles(lambda s=sampled_above: topk_mask_tracked(
            x, 0.3, sampled_above=s)) == 0
        assert second_call_compiles(lambda s=sampled_above, c=cuts: topk_mask_tracked(
            x * 1.001, 0.3, c, sampled_above=s)) == 0
    tree = mlp_params(jax.random.PRNGKey(0))
    _, cuts = topk_mask_tracked(tree, 0.3, scope="global", by_magnitude=True)
    assert second_call_compiles(lambda: topk_mask_tracked(
        tree, 0.3, cuts, scope="global", by_magnitude=True)) == 0


def test_kth_largest():
    x = wide_leaf().ravel()
    assert second_call_compiles(lambda: kth_largest(x, 17)) == 0
    assert compiles(lambda: kth_largest(x, 170)) == 0


def test_validation_still_runs_eagerly():
    x = wide_leaf()
    topk_mask(x, 0.5)
    with pytest.raises(ValueError, match="scores contain non-finite values"):
        topk_mask(x.at[3, 4].set(jnp.nan), 0.5)
    with pytest.raises(ValueError, match=r"count must be an integer in \[0, 30000\]"):
        topk_mask(x, count=30001)
    with pytest.raises(ValueError, match="density must lie in"):
        topk_mask(x, 1.5)


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_select_masks(distribution):
    scores = {"wide": jnp.abs(wide_leaf()), **mlp_params(jax.random.PRNGKey(0))}
    assert second_call_compiles(
        lambda: sparsejax.select_masks(scores, 0.2, distribution)) == 0


def test_layer_densities_and_kept_counts():
    params = {"wide": wide_leaf(), **mlp_params(jax.random.PRNGKey(0))}
    # 'global' ranks |params| on the device; the other distributions and kept_counts
    # work out integers on the host and compile nothing at all.
    assert second_call_compiles(lambda: sparsejax.layer_densities(params, 0.2, "global")) == 0
    assert compiles(lambda: sparsejax.layer_densities(params, 0.2, "erk")) == 0
    assert compiles(lambda: sparsejax.kept_counts(params, 0.2, "global")) == 0
    assert compiles(lambda: sparsejax.kept_counts(params, 0.2, "erk")) == 0


def mlp_apply(params, model_state, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


SGD = optax.sgd(0.1, momentum=0.9)
BUILDERS = {
    "dense": lambda: sparsejax.dense(SGD),
    "static": lambda: sparsejax.static(SGD, sparsity=0.9),
    "magnitude": lambda: sparsejax.magnitude(SGD, sparsity=0.9),
    "random_prune": lambda: sparsejax.random_prune(SGD, sparsity=0.9, distribution="erk"),
    "set": lambda: sparsejax.sparse_evolutionary(SGD, sparsity=0.9, update_every=10),
    "rigl": lambda: sparsejax.rigl(SGD, sparsity=0.9, end_step=100),
    "snfs": lambda: sparsejax.snfs(SGD, sparsity=0.9, update_every=10, total_steps=100),
    "gradual_magnitude": lambda: sparsejax.gradual_magnitude(SGD, sparsity=0.9,
                                                             total_steps=100),
    "edge_popup": lambda: sparsejax.edge_popup(SGD, sparsity=0.5),
    "edge_popup_global": lambda: sparsejax.edge_popup(SGD, sparsity=0.5, scope="global"),
    "biprop": lambda: sparsejax.biprop(SGD, sparsity=0.5),
    "biprop_ramp": lambda: sparsejax.biprop(SGD, sparsity=0.5, ramp_epochs=1.0,
                                            batches_per_epoch=10),
    "supermask_weights": lambda: sparsejax.supermask_weights(SGD, sparsity=0.5,
                                                             distribution="erk"),
    "synflow": lambda: sparsejax.synflow(SGD, sparsity=0.9, iterations=5, apply_fn=mlp_apply,
                                         input_shape=(20,)),
    "gates": lambda: sparsejax.gates(SGD, sparsity=0.9),
    "gates_hard_concrete": lambda: sparsejax.gates(SGD, gate="hard_concrete", sparsity=0.9),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_method_init(name):
    params, key = mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1)
    method = BUILDERS[name]()
    state = method.init(params, key)
    assert compiles(lambda: method.init(params, key)) == 0  # the same Method again
    assert compiles(lambda: BUILDERS[name]().init(params, key)) == 0  # built afresh
    # The hard masks (for the gates a global top-k of the gate parameters).
    compiles(lambda: method.hard_masks(state))
    assert compiles(lambda: BUILDERS[name]().hard_masks(state)) == 0


@pytest.mark.parametrize("name", ["static", "edge_popup"])
def test_method_init_with_a_wide_leaf(name):
    params = {"wide": {"kernel": wide_leaf()}, **mlp_params(jax.random.PRNGKey(0))}
    key = jax.random.PRNGKey(1)
    compiles(lambda: BUILDERS[name]().init(params, key))
    assert compiles(lambda: BUILDERS[name]().init(params, key)) == 0


def _ones_like(tree):
    return jax.tree_util.tree_map(jnp.ones_like, tree)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_an_eager_update_compiles_once(name):
    # An eager update used to trace and compile its lax.cond on every call (10 s per
    # RigL update on a small MLP); the second and third calls now compile nothing.
    params, key = mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1)
    method = BUILDERS[name]()
    state = method.init(params, key)
    grads = _ones_like(method.trainables(state))
    state = jax.block_until_ready(method.update(state, grads))
    for _ in range(2):
        assert compiles(lambda s=state: method.update(s, grads)) == 0
        state = method.update(state, grads)


@pytest.mark.parametrize("name", ["static", "rigl", "set", "snfs", "gradual_magnitude"])
def test_an_eager_sparse_tx_update_compiles_once(name):
    options = {"static": {}, "rigl": {"update_every": 1, "end_step": 100},
               "set": {"update_every": 1}, "snfs": {"update_every": 1, "total_steps": 100},
               "gradual_magnitude": {"total_steps": 100, "frequency": 1}}[name]
    tx = sparsejax.sparse_tx(name, SGD, sparsity=0.9, **options)
    params = mlp_params(jax.random.PRNGKey(0))
    opt_state = tx.init(params)
    grads = _ones_like(params)
    jax.block_until_ready(tx.update(grads, opt_state, params))
    for _ in range(2):
        assert compiles(lambda s=opt_state, p=params: tx.update(grads, s, p)) == 0
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)


_CACHED_STEP = """
import json, os, sys
import jax, jax.numpy as jnp, optax
import sparsejax

# A persistent-cache hit still reports a backend compile event (its timing wraps the
# cache read), so the compilations are the requests that the cache did not answer.
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
key = jax.random.PRNGKey(0)
params = {f"l{i}": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (64, 64)),
                    "bias": jnp.zeros(64)} for i in range(3)}
tx = sparsejax.sparse_tx("rigl", optax.sgd(0.1, momentum=0.9), sparsity=0.9,
                         update_every=100, end_step=1000)

def step(params, opt_state, x):
    def loss(p):
        for i in range(3):
            x_ = jnp.tanh(x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"])
        return jnp.mean(x_ ** 2)
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

opt_state = jax.jit(tx.init)(params)
lowered = jax.jit(step).lower(params, opt_state, jnp.ones((8, 64)))
events.clear()
lowered.compile()
print(json.dumps({"step_compiles":
                  events.count("/jax/compilation_cache/compile_requests_use_cache")
                  - events.count("/jax/compilation_cache/cache_hits")}))
"""


def test_a_second_process_takes_the_rigl_step_from_the_persistent_cache(tmp_path):
    # No host callback in the step (the finite-scores check is opt-in checkify), so the
    # program's cache key is stable and a second process compiles nothing for it.
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", _CACHED_STEP], env=env,
                                      check=True, capture_output=True, text=True
                                      ).stdout.splitlines()[-1]) for _ in range(2)]
    assert runs[0]["step_compiles"] == 1
    assert runs[1]["step_compiles"] == 0
