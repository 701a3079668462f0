"""Conversion of the official SSL checkpoints into qscore_jax Flax variables."""
