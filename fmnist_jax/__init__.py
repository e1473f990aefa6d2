"""fmnist_jax: a pure-functional JAX/Flax Fashion-MNIST classifier.

Array names end in their shape, one letter an axis, each letter with one meaning:

    N  examples (a split, or the images of a file)      B  examples in one batch
    P  examples after padding to whole batches          S  steps (batches) of an epoch
    H, W  image height and width (28); 1 the grey channel
    F  feature channels of an activation                I, O  input and output channels of a kernel
    Y, X  a kernel's height and width
    L  patch length (kernel height x width x input channels)
    C  classes (10)                                      K  the k of top-k
    M  members of a `--seeds` run (one model per seed)   Q  one member's examples, as
                                                            indices into a shared N
    R  a Toeplitz-conv matmul row: output columns x F, flattened (layers.py)
    D  the columns of a CSV line: the label, then H x W pixels (785)

`images_NxHxWx1` is a uint8 (N, 28, 28, 1) array, `logits_BxC` a (B, 10) one.
"""

from fmnist_jax.errors import FmnistError

__all__ = ["FmnistError"]
__version__ = "0.1.0"
