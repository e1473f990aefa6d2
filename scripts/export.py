"""Export a run's model: `python scripts/export.py RUN_DIR --format stablehlo|onnx|torch`."""

from fmnist_jax.cli import export_main

if __name__ == "__main__":
    export_main()
