"""Strong lottery tickets over frozen weights: Edge-Popup, relaxed Bernoulli gates,
binarized multi-prize tickets, supermask plus weight training.

Not implemented yet; methods register here with ``register_method``.
"""
