"""LeNet-5 as in Caffe's MNIST example: two 5x5 convolutions, max pooling, two dense layers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["LeNet"]


class LeNet(nn.Module):
    """A LeNet-style CNN: conv(20, 5x5)-pool-conv(50, 5x5)-pool-dense(500)-dense.

    ReLU activations, 2x2 max pooling with stride 2, ``VALID`` convolutions (28x28 inputs give
    a 4x4x50 = 800-dimensional flattened map, as in Caffe's LeNet). With ``num_classes=None``
    it returns the 500 features of the penultimate layer (the encoder); with an integer it adds a
    ``head`` ``Dense``.

    Attributes:
      num_classes: number of outputs of the ``head``; ``None`` returns features.
      features: channels of the two convolutions, then the width of the dense layer.
      padding: convolution padding (``"VALID"`` as in Caffe, ``"SAME"`` keeps the size).
      dtype: computation dtype (parameters stay float32).

    Example:
      >>> model = LeNet(num_classes=10)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> model.apply(params, jnp.zeros((5, 28, 28, 1))).shape
      (5, 10)

    References:
      LeCun, Bottou, Bengio and Haffner. Gradient-based learning applied to document
      recognition. Proc. IEEE 1998.
    """

    num_classes: int | None = None
    features: tuple[int, int, int] = (20, 50, 500)
    padding: str = "VALID"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"LeNet expects [N, H, W, C] images, got shape {x.shape}")
        c1, c2, d = self.features
        x = nn.relu(nn.Conv(c1, (5, 5), padding=self.padding, dtype=self.dtype, name="conv_0")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(c2, (5, 5), padding=self.padding, dtype=self.dtype, name="conv_1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(d, dtype=self.dtype, name="dense_0")(x))
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x
