"""The training run: one run from a config to its folder (loop, resume, evaluation, outputs)."""
