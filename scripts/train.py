"""Train a Fashion-MNIST classifier: `python scripts/train.py --manual-dir DIR` (DIR: the four official .gz files)."""

from fmnist_jax.cli import train_main

if __name__ == "__main__":
    train_main()
