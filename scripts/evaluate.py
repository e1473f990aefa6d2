"""Evaluate a run folder: `python scripts/evaluate.py runs/RUN`."""

from fmnist_jax.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
