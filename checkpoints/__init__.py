"""Registry of the official SSL checkpoints (registry.toml) and the shipped demo model.

This directory is installed as the package ``qscore_jax.checkpoints`` so that its data
files are found after a regular (non-editable) install; converted checkpoints written
under ``checkpoints/<model-id>/`` are not part of it.
"""
