"""Experiment configs (ml_collections): ``get_config(arg)`` per file."""
