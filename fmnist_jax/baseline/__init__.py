"""The PyTorch baseline: the LeNet-5 report's recipe in PyTorch, to compare the JAX side against.

- `torch_lenet`: the model, the torch-dataloader (per-sample Dataset + DataLoader) and the
  torch-tensors (whole split on the device, index batches) input pipelines, training and
  evaluation;
- `exchange`: Flax params <-> torch state_dict for LeNet-5, exact both ways;
- `order`: the JAX side's batch order and init from its keys, so torch can be fed the same
  batches from the same init (needs only jax, not torch).

Torch is imported only by the modules of this package, and only when they are imported:
`import fmnist_jax.baseline` itself needs nothing beyond the JAX side.
"""
