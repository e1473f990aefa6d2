"""Measurement studies of fmnist_jax (not installed): per-op profiles and timing tables. Run from the repository root, e.g. `python -m benchmarks.time_seeds`."""
