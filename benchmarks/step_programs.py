"""Fingerprints of the native engine's jitted train step, per method and pattern: the
sha256 of the lowered StableHLO text (``jax.jit(step).lower(...).as_text()``).

A change that only moves code (a refactor) must leave every fingerprint as it was: then
the programs XLA compiles, their compile time and their step time are unchanged. Run it on
two trees and compare (``PYTHONPATH=<other tree> python benchmarks/step_programs.py``);
the fingerprints depend on the JAX version, so compare on one machine.

    python benchmarks/step_programs.py [--out programs.json]
"""

import argparse
import hashlib
import json

import jax
import jax.numpy as jnp
import optax

import sparsejax
from sparsejax import make_train_step, stateless_loss

CASES = [
    ("gates", dict(sparsity=0.9, total_steps=100)),
    ("edge_popup", dict(sparsity=0.5)),
    ("edge_popup", dict(sparsity=0.5, pattern="2:4")),
    ("biprop", dict(sparsity=0.5)),
    ("supermask_weights", dict(sparsity=0.5)),
    ("rigl", dict(sparsity=0.9, update_every=10, end_step=100)),
    ("rigl", dict(sparsity=0.5, update_every=10, end_step=100, pattern="channel")),
    ("set", dict(sparsity=0.5, update_every=10, end_step=100, pattern="block:4")),
    ("snfs", dict(sparsity=0.5, update_every=10, end_step=100, total_steps=100, pattern="2:4")),
    ("static", dict(sparsity=0.5, pattern="2:4")),
    ("gradual_magnitude", dict(sparsity=0.9, end_step=50, frequency=10, total_steps=100)),
    ("gradual_magnitude", dict(sparsity=0.75, end_step=50, frequency=10, total_steps=100,
                               pattern="block:4")),
    ("gradual_magnitude", dict(sparsity=0.5, end_step=50, frequency=10, total_steps=100,
                               pattern="2:4")),
]


def _loss(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    return jnp.mean((h @ params["head"]["kernel"] - y) ** 2)


def fingerprints() -> dict[str, str]:
    """``{method[:pattern]: sha256 of its step's StableHLO}`` on a small MLP."""
    params = {"fc1": {"kernel": jnp.ones((16, 32)), "bias": jnp.zeros(32)},
              "head": {"kernel": jnp.ones((32, 4))}}
    batch = (jnp.ones((8, 16)), jnp.zeros((8, 4)))
    out = {}
    for name, options in CASES:
        method = sparsejax.get_method(name, optax.sgd(0.1), **options)
        state = method.init(params, jax.random.PRNGKey(0))
        text = jax.jit(make_train_step(method, stateless_loss(_loss))).lower(state, batch).as_text()
        key = name + (f":{options['pattern']}" if "pattern" in options else "")
        out[key] = hashlib.sha256(text.encode()).hexdigest()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = {"jax": jax.__version__, "fingerprints": fingerprints()}
    text = json.dumps(result, indent=1, sort_keys=True)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
