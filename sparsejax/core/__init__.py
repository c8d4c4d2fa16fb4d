"""The core every method is built from: exact top-k, masks, sparsity patterns, per-layer
densities, straight-through estimators, schedules and the optax masking transforms.

Nothing here imports a method, an integration or the harness.
"""
