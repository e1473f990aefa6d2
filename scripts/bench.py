"""JAX vs the PyTorch baseline in one run: `python scripts/bench.py` (`--quick` for a smoke test)."""

from fmnist_jax.cli import bench_main

if __name__ == "__main__":
    bench_main()
