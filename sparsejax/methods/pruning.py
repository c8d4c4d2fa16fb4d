"""Score, then keep the top fraction: magnitude, random, SNIP, GraSP, SynFlow, and
gradual magnitude pruning.

Not implemented yet; methods register here with ``register_method``.
"""
