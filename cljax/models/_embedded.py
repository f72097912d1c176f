"""MiniCLIP, the embedded foundation model shipped inside the package, and CLIP folder loading.

``embedded_checkpoint()`` is a complete Hugging Face CLIP folder (``config.json``,
``model.safetensors``, tokenizer files, ``preprocessor_config.json``, a model card) that
``transformers.CLIPModel.from_pretrained`` loads as well. :func:`load_pretrained` reads such a
folder (MiniCLIP's or a real CLIP's) into the cljax model, its params and its tokenizer.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from cljax.models._clip import CLIP, CLIPImageEncoder
from cljax.models._clip_convert import config_from_hf, load_hf_safetensors
from cljax.models._tokenizer import CLIPTokenizer

__all__ = [
    "PretrainedCLIP",
    "embedded_checkpoint",
    "image_encoder_params",
    "load_pretrained",
    "normalize_images",
]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def embedded_checkpoint() -> Path:
    """The folder of MiniCLIP inside the installed package.

    Raises:
      FileNotFoundError: if the package was installed without its data files.
    """
    path = Path(str(importlib.resources.files("cljax.models") / "embedded" / "miniclip"))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"MiniCLIP is missing from {path}: the package was installed without its data "
            "files (reinstall cljax, or build the model with `python -m experiments.pretrain`)"
        )
    return path


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(model: CLIP, params: Any, ids: jax.Array) -> jax.Array:
    # One compiled function per model config (a fresh jit per call would recompile each time).
    # Flax types apply's result as a value or a (value, variables) pair; without `mutable`
    # it is the value.
    return cast(jax.Array, model.apply({"params": params}, ids, method=CLIP.encode_text))


class PretrainedCLIP(NamedTuple):
    """A CLIP read from a Hugging Face folder.

    Attributes:
      model: the :class:`~cljax.models.clip.CLIP` module.
      params: its parameters (Hugging Face layout).
      tokenizer: the folder's BPE tokenizer.
      mean, std: the image normalisation of ``preprocessor_config.json``.
      path: the folder.
    """

    model: CLIP
    params: Any
    tokenizer: CLIPTokenizer
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    path: Path

    @property
    def logit_scale(self) -> float:
        """``exp`` of the learned logit scale (the temperature's inverse)."""
        return float(np.exp(np.asarray(self.params["logit_scale"])))

    def image_encoder(self) -> CLIPImageEncoder:
        """The image tower + projection as its own module (what merging fine-tunes)."""
        return CLIPImageEncoder(self.model.config)

    def encode_text(self, texts: list[str], *, batch_size: int = 256) -> jax.Array:
        """Projected, unnormalised text embeddings ``[len(texts), D]``."""
        out = []
        for s in range(0, len(texts), batch_size):
            ids, _ = self.tokenizer(list(texts[s : s + batch_size]))
            n = len(ids)  # pad to one shape: one compilation for any number of texts
            ids = np.pad(ids, ((0, batch_size - n), (0, 0)), constant_values=ids[0, 0])
            out.append(_encode_text(self.model, self.params, jnp.asarray(ids))[:n])
        return jnp.concatenate(out)


def load_pretrained(path: str | os.PathLike | None = None, *, dtype=None) -> PretrainedCLIP:
    """Reads a Hugging Face CLIP folder (default: the embedded MiniCLIP).

    Args:
      path: a folder with ``config.json``, ``model.safetensors`` and the tokenizer files.
      dtype: cast the params to this dtype (default: as stored).

    Raises:
      FileNotFoundError: if a required file is missing (named).
    """
    d = Path(path) if path is not None else embedded_checkpoint()
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name} is missing: not a complete CLIP folder")
    config = config_from_hf(json.loads((d / "config.json").read_text()))
    model = CLIP(config)
    params = load_hf_safetensors(d / "model.safetensors", model, dtype=dtype)
    ctx = config.text.max_position_embeddings
    tokenizer = CLIPTokenizer.from_pretrained(d, context_length=ctx)
    mean, std = _CLIP_MEAN, _CLIP_STD
    pre = d / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return PretrainedCLIP(model, params, tokenizer, mean, std, d)


def image_encoder_params(params: Any) -> dict:
    """The ``vision_model`` and ``visual_projection`` subtrees: :class:`CLIPImageEncoder` params."""
    return {
        "vision_model": params["vision_model"],
        "visual_projection": params["visual_projection"],
    }


def normalize_images(
    images: jax.Array | np.ndarray,
    mean: tuple[float, ...] = _CLIP_MEAN,
    std: tuple[float, ...] = _CLIP_STD,
) -> jax.Array:
    """uint8 (or [0, 255] float) images ``[N, H, W, 3]`` -> CLIP-normalised float32.

    The same arithmetic as ``CLIPImageProcessor``'s rescale and normalise for images already
    at the model's size.
    """
    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
