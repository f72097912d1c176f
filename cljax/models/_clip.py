"""CLIP in ``flax.linen``, laid out like Hugging Face ``CLIPModel`` so its checkpoints convert 1:1.

The parameter tree mirrors the Hugging Face module names (``vision_model/encoder/layers_3/
self_attn/q_proj/kernel``), so a path rule written for one reads naturally on the other, and
:mod:`cljax.models.clip_convert` is a key-by-key mapping (transposes for ``Linear`` and conv
weights). OpenAI checkpoints use QuickGELU (``x * sigmoid(1.702 x)``); loading them into a
GELU config silently changes every feature (an open_clip pitfall,
mertyg/vision-language-models-are-bows#35), so the presets default to it.

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
  ICML 2021.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPImageEncoder",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "clip_config",
    "quick_gelu",
]

Activation = Literal["quick_gelu", "gelu"]


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def _act(name: Activation):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"hidden_act={name!r} must be 'quick_gelu' or 'gelu'")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        _act(self.hidden_act)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    hidden_act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # 2: the legacy convention, EOT = argmax of the token ids

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        _act(self.hidden_act)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    projection_dim: int = 512
    logit_scale_init: float = 2.6592  # log(1/0.07), the value CLIP starts from


_PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B/32": dict(vision=dict(patch_size=32), text=dict(), projection_dim=512),
    "ViT-B/16": dict(vision=dict(patch_size=16), text=dict(), projection_dim=512),
    "ViT-L/14": dict(
        vision=dict(
            patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_heads=12),
        projection_dim=768,
    ),
}


def clip_config(name: str) -> CLIPConfig:
    """The configuration of a public CLIP (``"ViT-B/32"``, ``"ViT-B/16"``, ``"ViT-L/14"``).

    Raises:
      ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in _PRESETS:
        raise ValueError(f"name={name!r} is not a known CLIP config; known: {sorted(_PRESETS)}")
    p = _PRESETS[name]
    return CLIPConfig(
        vision=CLIPVisionConfig(**p["vision"]),
        text=CLIPTextConfig(**p["text"]),
        projection_dim=p["projection_dim"],
    )


class _Attention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        head_dim = self.hidden_size // self.num_heads
        dense = lambda name: nn.Dense(self.hidden_size, dtype=self.dtype, name=name)
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, head_dim)
        q = split(dense("q_proj")(x)) * head_dim**-0.5
        k = split(dense("k_proj")(x))
        v = split(dense("v_proj")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.hidden_size)
        return dense("out_proj")(out)


class _MLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    act: Activation
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _act(self.act)(x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class _EncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    act: Activation
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + _Attention(self.hidden_size, self.num_heads, self.dtype, name="self_attn")(h, mask)
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + _MLP(self.hidden_size, self.intermediate_size, self.act, self.dtype, name="mlp")(
            h
        )


class _Encoder(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    act: Activation
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.num_layers):
            x = _EncoderLayer(
                self.hidden_size,
                self.intermediate_size,
                self.num_heads,
                self.act,
                self.eps,
                self.dtype,
                name=f"layers_{i}",
            )(x, mask)
        return x


class CLIPVisionModel(nn.Module):
    """The image tower; returns the pooled (post-LayerNorm class token) features ``[N, hidden]``.

    Input: images ``[N, H, W, 3]`` already normalised with CLIP's mean and std.
    """

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        n = images.shape[0]
        x = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(images.astype(self.dtype))
        x = x.reshape(n, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        x = jnp.concatenate(
            [jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c.hidden_size)), x], axis=1
        )
        num_pos = (c.image_size // c.patch_size) ** 2 + 1
        if x.shape[1] != num_pos:
            raise ValueError(
                f"CLIPVisionModel: images of shape {images.shape[1:3]} give {x.shape[1] - 1} patches, "
                f"the config expects {num_pos - 1} (image_size={c.image_size})"
            )
        pos = self.param(
            "position_embedding", nn.initializers.normal(0.02), (num_pos, c.hidden_size)
        )
        x = x + pos.astype(x.dtype)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        x = _Encoder(
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_layers,
            c.hidden_act,
            c.layer_norm_eps,
            self.dtype,
            name="encoder",
        )(x)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(
            x[:, 0]
        )


class CLIPTextModel(nn.Module):
    """The text tower; returns the pooled features at the end-of-text token ``[N, hidden]``."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        _, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(
                f"CLIPTextModel: {length} tokens exceed max_position_embeddings={c.max_position_embeddings}"
            )
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(
            input_ids
        )
        pos = nn.Embed(
            c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="position_embedding"
        )(jnp.arange(length)[None])
        x = tok + pos
        mask = nn.make_causal_mask(input_ids, dtype=jnp.bool_)
        if attention_mask is not None:
            mask = mask & nn.make_attention_mask(
                jnp.ones_like(input_ids), attention_mask, dtype=jnp.bool_
            )
        x = _Encoder(
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_layers,
            c.hidden_act,
            c.layer_norm_eps,
            self.dtype,
            name="encoder",
        )(x, mask)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if c.eos_token_id == 2:
            eot = jnp.argmax(input_ids, axis=-1)
        else:
            eot = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        return x[jnp.arange(x.shape[0]), eot]


class CLIP(nn.Module):
    """Both towers, their projections and the logit scale (Hugging Face ``CLIPModel`` layout).

    Methods: ``encode_image(images)`` and ``encode_text(ids, mask)`` return projected,
    *unnormalised* embeddings; ``__call__`` returns ``(logits_per_image, image_embeds,
    text_embeds)`` with L2-normalised embeddings, like the Hugging Face model.
    """

    config: CLIPConfig = dataclasses.field(default_factory=CLIPConfig)
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        self.vision_model = CLIPVisionModel(c.vision, self.dtype)
        self.text_model = CLIPTextModel(c.text, self.dtype)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.logit_scale_init), ()
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(images))

    def encode_text(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def __call__(self, images, input_ids, attention_mask=None):
        img = self.encode_image(images)
        txt = self.encode_text(input_ids, attention_mask)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits = jnp.exp(self.logit_scale) * img @ txt.T
        return logits, img, txt


class CLIPImageEncoder(nn.Module):
    """The image encoder alone (vision tower + projection), as merged by the 8-task benchmark.

    Its params are the ``vision_model`` and ``visual_projection`` subtrees of :class:`CLIP`
    with the same names, so a full checkpoint's image half and a vision-only checkpoint
    (``CLIPVisionModelWithProjection``) both convert to it. Returns unnormalised embeddings.
    """

    config: CLIPConfig = dataclasses.field(default_factory=CLIPConfig)
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.vision_model = CLIPVisionModel(self.config.vision, self.dtype)
        self.visual_projection = nn.Dense(
            self.config.projection_dim, use_bias=False, dtype=self.dtype
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(images))
