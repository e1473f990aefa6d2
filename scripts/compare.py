"""Compare two runs of several seeds, seed by seed: `python scripts/compare.py RUN_A RUN_B`."""

from fmnist_jax.cli import compare_main

if __name__ == "__main__":
    compare_main()
