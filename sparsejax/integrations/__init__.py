"""The methods in code the user already has: the optax form (:func:`sparsejax.sparse_tx`),
Flax NNX (public path :mod:`sparsejax.nnx`) and Flax linen (:mod:`sparsejax.linen`)."""
