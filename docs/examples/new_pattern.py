"""Where things go: a new sparsity pattern (docs/design.md, "Where things go").

A pattern is one small type in sparsejax/core/patterns/kinds.py answering the interface
every mask-choosing method asks (`check_shape`, `units`, `topk`, `counts`,
`fixed_density`, `ranks_globally`). This one keeps or prunes whole *input* channels (the
rows of a Dense kernel `(in, out)`, the `in` axis of a conv kernel), ranked by the sum of
their scores; it belongs to the `WholeUnits` family, so it only says what a unit is.
Every method that takes a `pattern` can then use it. Run it:
`python docs/examples/new_pattern.py` (tests/test_where_things_go.py does).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import optax

import sparsejax
from sparsejax.core.patterns import WholeUnits


@dataclasses.dataclass(frozen=True)
class InputChannel(WholeUnits):
    """Whole input channels (the kernel's axis -2), ranked by their summed scores."""

    kind: ClassVar[str] = "input_channel"

    def units(self, shape):
        return int(shape[-2])

    def unit_sums(self, scores):
        return jnp.moveaxis(scores, -2, 0).reshape(scores.shape[-2], -1).sum(axis=1)

    def spread(self, kept, shape):
        return jnp.broadcast_to(kept.reshape((1,) * (len(shape) - 2) + (shape[-2], 1)), shape)


if __name__ == "__main__":
    pattern = InputChannel()
    scores = jnp.array([[1.0, 1.0], [5.0, 0.0], [0.0, 0.0], [3.0, 3.0]])  # (in=4, out=2)
    assert sparsejax.pattern_mask(scores, pattern, 0.5).tolist() == [
        [False, False], [True, True], [False, False], [True, True]]  # rows 1 and 3

    # Any method with a pattern option takes it: static sparse training, and RigL moving
    # whole input channels.
    params = {"fc": {"kernel": jnp.ones((8, 3))}, "head": {"kernel": jnp.ones((4, 2))}}
    for name, options in (("static", {}), ("rigl", {"update_every": 1, "end_step": 10})):
        tx = sparsejax.sparse_tx(name, optax.sgd(0.1), sparsity=0.5, distribution="uniform",
                                 pattern=pattern, **options)
        opt_state = tx.init(params)
        grads = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(1), p.shape),
                                       params)
        updates, opt_state = tx.update(grads, opt_state, sparsejax.zero_pruned(params, opt_state))
        for path, mask in (("fc", (8, 3)), ("head", (4, 2))):
            kept = sparsejax.masks_of(opt_state)[path]["kernel"]
            rows = kept.all(axis=1) | ~kept.any(axis=1)  # every row whole: kept or pruned
            assert bool(rows.all()) and int(kept.all(axis=1).sum()) == mask[0] // 2, name
    print("input-channel masks: whole rows, half of them kept, static and rigl")
