"""What a run writes and reads: checkpoints, atomic files, sparse export for inference."""
