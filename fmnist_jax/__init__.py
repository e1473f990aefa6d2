"""fmnist_jax: a pure-functional JAX/Flax Fashion-MNIST classifier."""

from fmnist_jax.errors import FmnistError

__all__ = ["FmnistError"]
__version__ = "0.1.0"
