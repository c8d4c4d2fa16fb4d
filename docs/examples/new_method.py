"""Where things go: a new training method (docs/design.md, "Where things go").

A method is a file in sparsejax/methods/ that builds a `Method` from the core's parts and
registers it by name; the optax form, the native engine and the CLI then reach it. This
one keeps, in every layer, the weights largest in magnitude at init (a static mask chosen
by |w| instead of at random), trained with the masked optimizer every fixed-mask method
uses. Run it: `python docs/examples/new_method.py` (tests/test_where_things_go.py does).
"""

import jax
import jax.numpy as jnp
import optax

import sparsejax
from sparsejax.methods.fixed import fixed_mask


def init_magnitude(optimizer: optax.GradientTransformation, sparsity: float,
                   distribution: str = "uniform") -> sparsejax.Method:
    """Static sparse training under the top ``1 - sparsity`` of |w| at init."""
    sparsejax.check_sparsity(sparsity)

    def make_masks(params, rng, model_state, context):
        del rng, model_state, context  # the scores are the weights themselves
        scores = jax.tree_util.tree_map(jnp.abs, params)
        return sparsejax.select_masks(scores, 1.0 - sparsity, distribution)

    return fixed_mask(optimizer, make_masks, name="init_magnitude")


sparsejax.register_method("init_magnitude", init_magnitude)

if __name__ == "__main__":
    params = {"dense": {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)}}
    tx = sparsejax.sparse_tx("init_magnitude", optax.sgd(0.1), sparsity=0.75)
    opt_state = tx.init(params)
    params = sparsejax.zero_pruned(params, opt_state)
    grads = {"dense": {"kernel": jnp.ones((4, 4))}}
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    mask = sparsejax.masks_of(opt_state)["dense"]["kernel"]
    assert mask.tolist() == [[False] * 4, [False] * 4, [False] * 4, [True] * 4]  # 13..16 kept
    assert float(jnp.abs(params["dense"]["kernel"][:3]).sum()) == 0.0  # pruned stay zero
    print("init_magnitude keeps", int(mask.sum()), "of", mask.size, "weights")
