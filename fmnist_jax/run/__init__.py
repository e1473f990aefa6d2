"""One training run: the config and presets, the host loop, the compiled epochs, the devices,
the run folder with its history and checkpoints, TensorBoard."""
