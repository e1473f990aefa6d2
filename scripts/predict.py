"""Predict clothing classes: `python scripts/predict.py RUN_DIR shirt.png boot.jpg --top-k 3`."""

from fmnist_jax.cli import predict_main

if __name__ == "__main__":
    predict_main()
