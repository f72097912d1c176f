"""The multi-layer perceptron of the gradient-projection papers (GPM's 3-layer MLP)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MLP"]


class MLP(nn.Module):
    """A ReLU multi-layer perceptron that flattens its input.

    With the defaults it is the 3-layer MLP of GPM's Permuted-MNIST experiments
    (784-100-100-10, ReLU, no dropout). With ``num_classes=None`` it returns the features of
    the last hidden layer (the encoder); with an integer it adds a ``head`` ``Dense``.

    Attributes:
      hidden: widths of the hidden layers, named ``hidden_0``, ``hidden_1``, ...
      num_classes: number of outputs of the ``head``; ``None`` returns features.
      use_bias: whether the hidden layers and the head have biases (GPM's MLP has none).
      dtype: computation dtype (parameters stay float32).

    Example:
      >>> model = MLP(hidden=(100, 100), num_classes=10)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> model.apply(params, jnp.zeros((5, 28, 28, 1))).shape
      (5, 10)

    References:
      Saha, Garg and Roy. Gradient Projection Memory for Continual Learning. ICLR 2021.
    """

    hidden: Sequence[int] = (100, 100)
    num_classes: int | None = None
    use_bias: bool = True
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"MLP: hidden={tuple(self.hidden)} must be positive widths")
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype, name=f"hidden_{i}")(x)
            x = nn.relu(x)
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, use_bias=self.use_bias, dtype=self.dtype, name="head")(x)
        return x
