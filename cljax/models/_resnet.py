"""ResNet-18 in Flax linen, with BatchNorm and a configurable width and stem."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["BasicBlock", "ResNet", "ResNet18"]


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and an identity (or 1×1 projection) shortcut."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=name
        )
        conv = lambda f, k, s, name: nn.Conv(
            f, (k, k), (s, s), padding=k // 2, use_bias=False, dtype=self.dtype, name=name
        )
        y = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, "conv1")(x)))
        y = norm("bn2")(conv(self.features, 3, 1, "conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm("downsample_bn")(conv(self.features, 1, self.strides, "downsample_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` stages (He et al., 2016).

    Attributes:
      stage_sizes: blocks per stage (``(2, 2, 2, 2)`` for ResNet-18).
      num_classes: classes of the final linear layer, or ``None`` to return the pooled
        features (``8 * width`` of them).
      width: channels of the first stage (64 in the paper); stage k has ``width * 2**k``.
      small_input: a 3×3 stride-1 stem without max-pooling (CIFAR / Multi-MNIST sized
        inputs, as the F-MTL Multi-MNIST backbone) instead of the 7×7 stride-2 stem and
        3×3 max-pooling of ImageNet models.
      dtype: computation dtype (parameters stay float32).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    num_classes: int | None = 1000
    width: int = 64
    small_input: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.astype(self.dtype)
        if self.small_input:
            x = nn.Conv(
                self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv1"
            )(x)
        else:
            x = nn.Conv(
                self.width,
                (7, 7),
                (2, 2),
                padding=3,
                use_bias=False,
                dtype=self.dtype,
                name="conv1",
            )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn1"
        )(x)
        x = nn.relu(x)
        if not self.small_input:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(self.width * 2**i, strides, self.dtype, name=f"layer{i + 1}_{j}")(
                    x, train
                )
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes is None:
            return x
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def ResNet18(  # noqa: N802 (a model constructor, named like the class it builds)
    num_classes: int | None = 1000,
    *,
    width: int = 64,
    small_input: bool = False,
    dtype: Any = jnp.float32,
) -> ResNet:
    """ResNet-18: four stages of two basic blocks (11.7M parameters at width 64, 1000 classes).

    Args:
      num_classes: classes of the final linear layer; ``None`` for the 512-d (``8 *
        width``) features, e.g. as the trunk of :class:`cljax.mtl.MultiHead`.
      width: channels of the first stage.
      small_input: 3×3 stride-1 stem without max-pooling, for 28–64 pixel inputs.
      dtype: computation dtype.

    Returns:
      The :class:`ResNet` module; call it with ``train=True`` and ``mutable=["batch_stats"]``
      while training.

    Example::

      >>> model = ResNet18(10, width=16, small_input=True)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

    References:
      He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """
    if width < 1:
        raise ValueError(f"ResNet18: {width=} must be >= 1")
    return ResNet((2, 2, 2, 2), num_classes, width, small_input, dtype)
