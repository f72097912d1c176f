"""A Vision Transformer (pre-norm, learned position embedding, class token)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ViT"]


class MlpBlock(nn.Module):
    """Dense(mlp_dim)-GELU-Dense(hidden_dim)."""

    mlp_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc_0")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(d, dtype=self.dtype, name="fc_1")(x)


class EncoderBlock(nn.Module):
    """x + MHA(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype, name="ln_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, name="attn"
        )(y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="ln_1")(x)
        return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class ViT(nn.Module):
    """A small Vision Transformer on ``[N, H, W, C]`` images.

    Non-overlapping ``patch_size`` patches are embedded by a strided convolution, a learned
    class token is prepended, a learned position embedding is added, then ``depth`` pre-norm
    blocks (LayerNorm, multi-head self-attention, LayerNorm, GELU MLP, both residual) and a final
    LayerNorm. ``pool="cls"`` returns the class token, ``pool="gap"`` the mean of the patch
    tokens. With ``num_classes=None`` the model returns these features (the encoder); with an
    integer it adds a ``head`` ``Dense``. No dropout.

    Parameter names: ``embedding`` (conv), ``cls``, ``pos_embedding``, ``block_{i}/{ln_0, attn,
    ln_1, mlp/fc_0, mlp/fc_1}``, ``ln_final``, ``head``.

    Attributes:
      patch_size: side of the square patches; must divide the image height and width.
      hidden_dim: token width.
      depth: number of transformer blocks.
      num_heads: attention heads; must divide ``hidden_dim``.
      mlp_dim: hidden width of each block's MLP.
      num_classes: outputs of the ``head``; ``None`` returns features.
      pool: ``"cls"`` or ``"gap"``.
      dtype: computation dtype (parameters stay float32).

    Example:
      >>> model = ViT(patch_size=7, hidden_dim=64, depth=2, num_heads=4, mlp_dim=128)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> model.apply(params, jnp.zeros((5, 28, 28, 1))).shape
      (5, 64)

    References:
      Dosovitskiy et al. An Image is Worth 16x16 Words: Transformers for Image Recognition at
      Scale. ICLR 2021.
    """

    patch_size: int
    hidden_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int | None = None
    pool: str = "cls"
    dtype: jnp.dtype | None = None

    def _check(self, x: jax.Array) -> None:
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"ViT: pool={self.pool!r} must be 'cls' or 'gap'")
        for name in ("patch_size", "hidden_dim", "depth", "num_heads", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViT: {name}={getattr(self, name)} must be >= 1")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"ViT: num_heads={self.num_heads} must divide hidden_dim={self.hidden_dim}"
            )
        if x.ndim != 4:
            raise ValueError(f"ViT expects [N, H, W, C] images, got shape {x.shape}")
        if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
            raise ValueError(
                f"ViT: patch_size={self.patch_size} must divide the image size {x.shape[1:3]}"
            )

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self._check(x)
        p = self.patch_size
        x = nn.Conv(
            self.hidden_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            name="embedding",
        )(x)
        n, h, w, d = x.shape
        x = jnp.reshape(x, (n, h * w, d))
        cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, d))
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"block_{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x[:, 1:], axis=1)
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return x
