import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from toy_mlp import batches, mlp_loss, mlp_params

import sparsejax
from sparsejax import (
    Method,
    SparseState,
    get_method,
    keep_pruned_zero,
    make_train_step,
    stateless_loss,
    topk_mask,
)
from sparsejax.methods import InitContext


def sgd_momentum_wd():
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


def test_pruned_weights_stay_exactly_zero_after_100_jitted_steps():
    params = mlp_params(jax.random.PRNGKey(0))
    masks = jax.tree_util.tree_map(lambda p: topk_mask(jnp.abs(p), 0.3) if p.ndim > 1
                                   else jnp.ones(p.shape, bool), params)
    params = sparsejax.apply_masks(params, masks)
    opt = optax.chain(sgd_momentum_wd(), keep_pruned_zero())
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(mlp_loss)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params, masks=masks)
        return optax.apply_updates(params, updates), opt_state

    xs, ys = batches(100)
    start = params
    for i in range(100):
        params, opt_state = step(params, opt_state, (xs[i], ys[i]))
    for p, m, p0 in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks),
                        jax.tree_util.tree_leaves(start), strict=True):
        p, m = np.asarray(p), np.asarray(m)
        assert np.all(p[~m] == 0.0)  # exactly zero, not just small
        assert np.all(p[m] != np.asarray(p0)[m]) or p.ndim == 1  # survivors trained


def test_without_keep_pruned_zero_weight_decay_and_momentum_revive_weights():
    # The control: the same chain without the transform moves pruned weights.
    params = mlp_params(jax.random.PRNGKey(0))
    masks = jax.tree_util.tree_map(lambda p: topk_mask(jnp.abs(p), 0.3), params)
    params = sparsejax.apply_masks(params, masks)
    opt = sgd_momentum_wd()
    grads = jax.grad(mlp_loss)(params, (batches(1)[0][0], batches(1)[1][0]))
    updates, _ = opt.update(grads, opt.init(params), params)
    moved = optax.apply_updates(params, updates)
    assert np.any(np.asarray(moved["Dense_0"]["kernel"])[~np.asarray(masks["Dense_0"]["kernel"])]
                  != 0)


@pytest.mark.parametrize("name", ["dense", "static"])
def test_method_contract_train_step_under_jit(name):
    options = {} if name == "dense" else {"sparsity": 0.8, "distribution": "erk"}
    method = get_method(name, sgd_momentum_wd(), **options)
    assert isinstance(method, Method)
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    assert isinstance(state, SparseState) and int(state.step) == 0
    step = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    xs, ys = batches(100)
    masks0 = state.masks
    losses = []
    for i in range(100):
        state, metrics = step(state, (xs[i % 10], ys[i % 10]))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 100
    assert losses[-1] < losses[0]
    # masks never change and pruned weights are exactly zero
    for m0, m, p in zip(jax.tree_util.tree_leaves(masks0), jax.tree_util.tree_leaves(state.masks),
                        jax.tree_util.tree_leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(m0), np.asarray(m))
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    effective = method.effective_params(state)
    report = sparsejax.sparsity_report(effective)
    expected_sparsity = 0.0 if name == "dense" else 0.8
    assert abs(report[-1].sparsity - expected_sparsity) < 1e-3


def test_static_keeps_exact_erk_counts():
    method = sparsejax.static(optax.sgd(0.1), sparsity=0.9, distribution="erk")
    params = mlp_params(jax.random.PRNGKey(0))
    state = jax.jit(method.init)(params, jax.random.PRNGKey(3))
    d = sparsejax.layer_densities(params, 0.1, "erk")
    for layer in ("Dense_0", "Dense_1"):
        kept = int(state.masks[layer]["kernel"].sum())
        assert kept == round(d[layer]["kernel"] * params[layer]["kernel"].size)
    assert bool(state.masks["Dense_0"]["bias"].all())


def test_train_step_under_pmap_averages_gradients():
    n = jax.local_device_count()
    if n < 2:
        pytest.skip("needs simulated devices (XLA_FLAGS set in conftest)")
    method = sparsejax.dense(optax.sgd(0.1))
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    xs, ys = batches(1)
    x, y = xs[0], ys[0]
    single = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))
    expected, _ = single(state, (x, y))
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x] * n), state)
    if 32 % n:
        pytest.skip("batch not divisible by device count")
    per_device = (x.reshape(n, -1, 20), y.reshape(n, -1))
    pstep = jax.pmap(make_train_step(method, stateless_loss(mlp_loss), axis_name="batch"),
                     axis_name="batch")
    result, _ = pstep(replicated, per_device)
    for a, b in zip(jax.tree_util.tree_leaves(expected.params),
                    jax.tree_util.tree_leaves(result.params), strict=True):
        np.testing.assert_allclose(np.asarray(b[0]), np.asarray(a), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(b[-1]))


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: .*dense"):
        get_method("rigl2", optax.sgd(0.1))


def test_keep_pruned_zero_requires_masks():
    opt = optax.chain(optax.sgd(0.1), keep_pruned_zero())
    p = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="needs the masks"):
        opt.update(p, opt.init(p), p)


def test_nonfinite_step_is_flagged_and_can_be_skipped():
    method = sparsejax.static(sgd_momentum_wd(), sparsity=0.5)
    state = method.init(mlp_params(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    xs, ys = batches(1)
    bad = (xs[0].at[0, 0].set(jnp.nan), ys[0])
    flagged, metrics = jax.jit(make_train_step(method, stateless_loss(mlp_loss)))(state, bad)
    assert not bool(metrics["finite"])
    assert np.isnan(np.asarray(flagged.params["Dense_0"]["kernel"])).any()
    skip = jax.jit(make_train_step(method, stateless_loss(mlp_loss), skip_nonfinite=True))
    skipped, metrics = skip(state, bad)
    assert not bool(metrics["finite"]) and int(skipped.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves((skipped.params, skipped.opt_state, skipped.masks)),
                    jax.tree_util.tree_leaves((state.params, state.opt_state, state.masks)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    good, metrics = skip(skipped, (xs[0], ys[0]))
    assert bool(metrics["finite"]) and int(good.step) == 2


def test_fixed_mask_scores_with_the_model_state_given_to_init():
    # make_masks sees init's model_state (batch statistics for batch-norm models)
    method = sparsejax.fixed_mask(
        optax.sgd(0.1), lambda p, rng, state, context: jax.tree_util.tree_map(
            lambda w: w > state["threshold"], p))
    params = {"w": jnp.arange(4.0).reshape(2, 2)}
    state = jax.jit(method.init)(params, jax.random.PRNGKey(0), {"threshold": jnp.float32(1.5)})
    np.testing.assert_array_equal(np.asarray(state.masks["w"]), [[False, False], [True, True]])
    assert float(state.model_state["threshold"]) == 1.5


@pytest.mark.parametrize("name", ["static", "magnitude", "set", "gradual_magnitude"])
def test_masked_methods_step_as_if_the_forward_pass_masked_the_weights(name):
    """The forward pass uses ``state.params`` as they are (pruned weights are zero there),
    and pruned weights get zero gradients before the optimizer: a step clipped by global
    norm equals the step computed by hand on ``w * m``, whose gradient is masked. A
    dense gradient reaching the clip would change the norm and every update."""
    clip = 0.05
    opt = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(0.1))
    options = {"sparsity": 0.7}
    if name == "set":
        options["update_every"] = 1000
    if name == "gradual_magnitude":
        options.update(total_steps=100, begin_step=1, end_step=2, frequency=1)
    method = get_method(name, opt, **options)
    params = mlp_params(jax.random.PRNGKey(0))
    xs, ys = batches(1)
    loss_fn = stateless_loss(mlp_loss)
    state = method.init(params, jax.random.PRNGKey(1),
                        context=InitContext(loss_fn, ((xs[0], ys[0]),)))
    step = jax.jit(make_train_step(method, loss_fn))
    if name == "gradual_magnitude":  # prunes after steps 1 and 2, then keeps its masks
        for _ in range(2):
            state, _ = step(state, (xs[0], ys[0]))
    masks = state.masks
    assert any(not bool(jnp.all(m)) for m in jax.tree_util.tree_leaves(masks))
    new_state, _ = step(state, (xs[0], ys[0]))

    grads = jax.grad(lambda p: mlp_loss(sparsejax.apply_masks(p, masks), (xs[0], ys[0])))(
        state.params)
    norm = optax.tree.norm(grads)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g * jnp.minimum(1.0, clip / norm),
                                      state.params, grads)
    for got, want in zip(jax.tree_util.tree_leaves(new_state.params),
                         jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert all(bool(jnp.all(jnp.where(m, True, p == 0)))
               for p, m in zip(jax.tree_util.tree_leaves(new_state.params),
                               jax.tree_util.tree_leaves(new_state.masks), strict=True))


@pytest.mark.parametrize("partitionable", [True, False])
def test_draw_flat_gives_the_numbers_of_the_shaped_draw(partitionable):
    """The methods draw their random numbers flat (a program XLA compiles several times
    faster for conv kernels); the numbers must be those of the shaped draw, bit for bit,
    under either of JAX's threefry modes, vmapped over keys too."""
    import functools

    from sparsejax.methods.draws import draw_flat, draws_per_leaf

    key = jax.random.PRNGKey(7)
    draws = [jax.random.normal, jax.random.bits,
             functools.partial(jax.random.uniform, minval=-0.3, maxval=0.3)]
    with jax.threefry_partitionable(partitionable):
        for shape in [(3, 3, 4, 8), (5, 7)]:
            for draw in draws:
                np.testing.assert_array_equal(jax.jit(lambda k, d=draw, s=shape: draw_flat(
                    d, k, s))(key), draw(key, shape))
        shapes = [(3, 3, 4, 8), (5, 7), (3, 3, 4, 8)]
        got = jax.jit(lambda k: draws_per_leaf(k, shapes, jax.random.normal))(key)
        for k, shape, value in zip(jax.random.split(key, 3), shapes, got, strict=True):
            np.testing.assert_array_equal(value, jax.random.normal(k, shape))


@pytest.mark.parametrize("partitionable", [True, False])
def test_draw_rows_gives_every_row_its_own_keys_draw_from_one_generator(partitionable):
    """``draw_rows`` draws the rows of every leaf size with JAX's threefry hash written
    out (no loop, where JAX's vmapped draws hold one per size); row ``r`` of an entry must
    hold exactly what ``uniform(keys[r], (n,))`` draws, for raw and typed keys, with an
    empty entry among them; under JAX's older threefry mode it falls back to one vmapped
    draw per entry, with the same numbers."""
    from sparsejax.methods.draws import UniformDraw, draw_rows

    lengths = [7, 1, 5, 300]
    for keys in (jax.random.split(jax.random.PRNGKey(3), 6),
                 jax.random.split(jax.random.key(3), 6)):
        entries = [keys[:2], keys[2:3], keys[2:2], keys[3:6]]
        for draw in (UniformDraw(), UniformDraw(1e-6, 1 - 1e-6), UniformDraw(-0.3, 0.3)):
            with jax.threefry_partitionable(partitionable):
                rows = jax.jit(lambda e, d=draw: draw_rows(d, e, lengths))(entries)
                flat = jax.jit(lambda e, d=draw: draw_rows(d, e, lengths, once=True))(entries)
                for got, once, ks, n in zip(rows, flat, entries, lengths, strict=True):
                    np.testing.assert_array_equal(once, got)  # the layout made once
                    want = jax.jit(lambda ks, d=draw, n=n: jax.vmap(
                        lambda k: d(k, (n,)))(ks))(ks)
                    assert got.shape == (len(ks), n)
                    np.testing.assert_array_equal(got, want)
    with jax.threefry_partitionable(partitionable):
        text = jax.jit(lambda e: draw_rows(UniformDraw(), e, lengths)).lower(
            entries).as_text()
    # the hash written out (draws.threefry2x32: no loop), against one of JAX's per
    # entry (the empty one's included), a loop each on CPU
    assert text.count("call @threefry2x32") == (0 if partitionable else len(entries))
    assert ("stablehlo.while" in text) == (not partitionable)


def test_draw_rows_made_once_hashes_sizes_apart_from_2_to_the_32_draws(monkeypatch):
    """The flat layout of a draw made once (``once=True``) counts every draw in one uint32
    index, which would wrap from 2**32 draws in all and repeat draws; there each size
    hashes apart. Traced only (``eval_shape``): nothing of that size is allocated."""
    from sparsejax.methods import draws
    from sparsejax.methods.draws import UniformDraw

    flat = []
    real = draws._draw_rows_flat
    monkeypatch.setattr(draws, "_draw_rows_flat", lambda *a: flat.append(a) or real(*a))
    keys = jax.random.split(jax.random.PRNGKey(0), 2)

    def rows(n):
        return jax.eval_shape(lambda k: draws.draw_rows(UniformDraw(), [k], [n], once=True),
                              keys)[0].shape

    assert rows(8) == (2, 8) and len(flat) == 1
    assert rows(2**31) == (2, 2**31) and len(flat) == 1  # 2**32 draws: per size


def test_draw_rows_keeps_no_array_of_its_size_but_a_few():
    """The one generator is JAX's hash written out (``draws.threefry2x32``, bitwise
    JAX's: the test above): JAX's CPU loop carried six arrays of the draw's size with a
    key per draw, and XLA copied them in and out of it (10x the output in temporaries
    here; ResNet-18's RigL step needed 574 MB of temporaries against 286 MB)."""
    from sparsejax.methods.draws import UniformDraw, draw_rows, threefry2x32

    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    entries, lengths = [keys[:2], keys[2:]], [3000, 5000]
    compiled = jax.jit(lambda e: draw_rows(UniformDraw(), e, lengths)).lower(
        entries).compile()
    output_bytes = (2 * 3000 + 3 * 5000) * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= 3 * output_bytes
    counts = [jnp.asarray(np.random.default_rng(0).integers(0, 2**32, 64, np.uint64)
                          .astype(np.uint32)) for _ in range(4)]
    for got, want in zip(jax.jit(threefry2x32)(*counts),
                         jax.extend.random.threefry2x32_p.bind(*counts), strict=True):
        np.testing.assert_array_equal(got, want)


def test_rigl_noise_is_the_same_grouped_or_per_leaf():
    """The engine draws its tie-breaking and SET's growth on leaves grouped by size, by
    one generator; a rule called on per-leaf signals draws leaf by leaf. Both must give
    each leaf the numbers of ``uniform(split(key, leaves)[i], shape)``."""
    from sparsejax.methods.dst_rules import Signals, grouped, uniform_per_leaf

    shapes = [(4, 6), (3, 5), (6, 4), (2,)]
    leaves = [jnp.ones(s) for s in shapes]
    key = jax.random.PRNGKey(11)
    signals = Signals(leaves, leaves, leaves, None, key)
    per_leaf = jax.jit(lambda k: uniform_per_leaf(k, signals))(key)
    group = grouped(signals)
    rows = jax.jit(lambda k: uniform_per_leaf(k, group))(key)
    by_rows = group.ungroup(rows, shapes)
    for i, (k, shape) in enumerate(zip(jax.random.split(key, 4), shapes, strict=True)):
        want = jax.random.uniform(k, shape)
        np.testing.assert_array_equal(per_leaf[i], want)
        np.testing.assert_array_equal(by_rows[i], want)


@pytest.mark.parametrize("name", ["static", "edge_popup", "gates"])
def test_an_init_is_one_search_and_one_generator_whatever_the_leaves(name):
    """``select_masks`` ranks every prunable leaf in one search, and the random scores and
    the strong tickets' weights come from one generator: the init program's loops do not
    grow with the number of leaves (ResNet-18's static init held 21 searches and 21
    generators and compiled in 9-11 s; in the lowered text static's loops were 6 and 14
    at 2 and 6 leaves; compiled, Edge-Popup's init held 8 and 16 and the gates' 4 and 8
    while each leaf folded its own key)."""
    def loops(sizes):
        params = {f"l{i}": jnp.ones((n, 8)) for i, n in enumerate(sizes)}
        method = sparsejax.get_method(name, optax.sgd(0.1), sparsity=0.5)
        # counted in the compiled program: a function called once per leaf (JAX's
        # fold_in) is one definition in the lowered text but a loop per call once
        # inlined (Edge-Popup's init held 8 and 16 while each leaf folded its own key)
        compiled = jax.jit(method.init).lower(params, jax.random.PRNGKey(0)).compile()
        return compiled.as_text().count(" while(")

    assert loops([3, 4]) == loops([3, 4, 5, 6, 7, 9]) > 0


def test_computed_once_is_fn_bitwise_under_jit_and_vmap():
    from sparsejax.methods.draws import computed_once

    x = jnp.linspace(-2.0, 3.0, 12).reshape(3, 4)  # first entries with either low bit
    np.testing.assert_array_equal(jax.jit(lambda v: computed_once(jnp.sin, v))(x),
                                  jax.jit(jnp.sin)(x))
    np.testing.assert_array_equal(jax.jit(jax.vmap(lambda v: computed_once(jnp.sin, v)))(x),
                                  jax.jit(jnp.sin)(x))
    # fn is compiled once: the other branch is zeros, not a second copy of fn
    compiled = jax.jit(lambda v: computed_once(jnp.sin, v)).lower(x).compile().as_text()
    assert compiled.count(" sine(") == 1


def test_per_leaf_noise_is_computed_once_not_copied_into_every_layer():
    """``draws_per_leaf`` computes its draw once (``computed_once``): XLA would otherwise
    copy the uniform-to-normal code into each leaf's fused consumer, and the program would
    grow with the number of layers (4 and 10 fusions holding ``erf_inv`` at 2 and 8
    layers without it; 2 and 2 with it)."""
    import re

    from sparsejax.methods.draws import draws_per_leaf

    def fusions_with_the_draw(layers):
        shapes = [(16, 16)] * layers

        def consumers(key, weights):
            noise = draws_per_leaf(key, shapes, jax.random.normal)
            return [jnp.tanh(w * n) for w, n in zip(weights, noise, strict=True)]

        text = jax.jit(consumers).lower(jax.random.PRNGKey(0),
                                        [jnp.ones(s) for s in shapes]).compile().as_text()
        return sum("erf_inv" in c for c in re.split(r"\n(?=\S)", text)
                   if c.startswith("%fused"))

    assert fusions_with_the_draw(8) == fusions_with_the_draw(2) <= 2


@pytest.mark.parametrize("name,options", [
    ("static", {"sparsity": 0.9}), ("rigl", {"sparsity": 0.9, "update_every": 10, "end_step": 75}),
    ("snfs", {"sparsity": 0.9, "update_every": 10, "total_steps": 100}),
    ("edge_popup", {"sparsity": 0.5}), ("gates", {"sparsity": 0.9})])
def test_eager_init_never_iterates_an_array(name, options, monkeypatch):
    """Eagerly, iterating a stacked array (``list(keys)``, ``zip(keys, ...)``, unpacking)
    compiles a program that slices every row at its own offset, a kernel per row on
    XLA's CPU backend (about 12 ms each: 0.6 s for 64 leaves' keys in Edge-Popup's and
    the gates' inits). Every init takes rows by ``split_rows`` instead."""
    from jax._src import array

    def refuse(self):
        raise AssertionError(f"iterated an array of shape {self.shape}")

    params, method = mlp_params(jax.random.PRNGKey(0)), get_method(name, optax.sgd(0.1), **options)
    monkeypatch.setattr(array.ArrayImpl, "_unstack", refuse)
    state = method.init(params, jax.random.PRNGKey(1))
    assert int(state.step) == 0


def test_traced_per_leaf_draws_are_sliced_once_per_leaf():
    """Traced, ``draws_per_leaf`` gives each leaf its draw in a buffer of its own: XLA
    fuses a slice of the stacked draw into every consumer (the gates' forward and
    backward pass), kernels that differ by their offset and compile one by one (about
    12 ms each), where consumers of buffers are one kernel per shape. Two consumers of
    ten equal leaves' noise: ten slices in the program, not twenty; the numbers as
    drawn eagerly. A size of few leaves (3) too: those are not sliced in the draw."""
    from sparsejax.methods.draws import UniformDraw, draws_per_leaf

    shapes = [(16, 16)] * 10 + [(8, 8)] * 3

    def use(key, xs):
        noise = draws_per_leaf(key, shapes, UniformDraw())
        return [x * n for x, n in zip(xs, noise, strict=True)], [
            jnp.sin(x) + n for x, n in zip(xs, noise, strict=True)]

    xs = [jnp.full(s, 2.0) for s in shapes]
    key = jax.random.PRNGKey(3)
    text = jax.jit(use).lower(key, xs).compile().as_text()
    assert text.count("f32[1,256]{1,0} slice(") == 10  # a leaf's row of the draw
    assert text.count("f32[1,64]{1,0} slice(") == 3
    products, _ = jax.jit(use)(key, xs)
    for product, eager in zip(products, draws_per_leaf(key, shapes, UniformDraw()),
                              strict=True):
        np.testing.assert_array_equal(np.asarray(product), 2.0 * np.asarray(eager))


def test_the_regrow_engine_takes_each_new_mask_out_of_its_stack_once():
    """The prune-and-regrow engine decides on stacked rows and ungroups the new masks
    through ``split_rows``: traced, one slice per leaf into a buffer of its own, not a
    slice fused into each of the mask's consumers (RigL's step on 128 layers compiled
    in 8.7 s that way, 6.7 s now)."""
    from sparsejax.methods.dst_rules import Signals

    shapes = [(16, 16)] * 10
    signals = Signals([jnp.ones(s) for s in shapes], None, None, None, None,
                      rows=(tuple(range(10)),))

    def use(stacked, xs):
        masks = signals.ungroup([stacked > 0.5], shapes)
        return [jnp.where(m, x, 0.0) for m, x in zip(masks, xs, strict=True)], [
            m & (x > 1) for m, x in zip(masks, xs, strict=True)]

    stacked = jax.random.uniform(jax.random.PRNGKey(0), (10, 256))
    xs = [jnp.full(s, 2.0) for s in shapes]
    text = jax.jit(use).lower(stacked, xs).compile().as_text()
    assert text.count("pred[1,256]{1,0} slice(") == len(shapes)
    kept, _ = jax.jit(use)(stacked, xs)
    for row, leaf in enumerate(kept):
        np.testing.assert_array_equal(np.asarray(leaf).ravel(),
                                      np.where(np.asarray(stacked[row]) > 0.5, 2.0, 0.0))
