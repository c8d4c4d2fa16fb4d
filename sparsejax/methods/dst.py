"""Dynamic sparse training: SET, RigL and SNFS as one prune-and-regrow engine.

Not implemented yet; methods register here with ``register_method``.
"""
