"""Continuously relaxed Bernoulli gates over frozen weights (Gaussian stochastic gates and
hard-concrete L0 gates): strong lottery tickets without a straight-through estimator.

Not implemented yet; methods register here with ``register_method``.
"""
