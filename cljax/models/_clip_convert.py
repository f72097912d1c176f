"""Hugging Face CLIP checkpoints (safetensors) to cljax CLIP params and back.

The cljax tree mirrors Hugging Face names; the mapping only renames leaves (``weight`` ->
``kernel``/``scale``/``embedding``), folds ``layers.3`` into ``layers_3``, drops the
``embeddings`` level, and transposes weights: ``Linear`` ``[out, in]`` -> Dense ``[in, out]``,
conv ``[out, in, kh, kw]`` -> ``[kh, kw, in, out]`` (PyTorch and Flax layouts). Integer buffers
(``position_ids``) are not parameters and are skipped.

A full ``CLIPModel`` checkpoint converts to :class:`~cljax.models.CLIP` params; a vision-only
one (``CLIPVisionModelWithProjection``) to :class:`~cljax.models.CLIPImageEncoder` params.
:func:`save_hf_pretrained` writes ``model.safetensors`` and ``config.json`` that
``transformers.CLIPModel.from_pretrained`` loads, so merged models go back to PyTorch users.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cljax import safetensors as st
from cljax import tree as ct
from cljax.models._clip import CLIP, CLIPConfig, CLIPImageEncoder, CLIPTextConfig, CLIPVisionConfig

__all__ = [
    "CheckpointMismatchError",
    "config_from_hf",
    "config_to_hf",
    "from_hf_state_dict",
    "hf_key",
    "load_hf_safetensors",
    "save_hf_pretrained",
    "to_hf_state_dict",
]

_SKIPPED = ("position_ids",)


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model; the message lists them all."""


def hf_key(path: str) -> tuple[str, str]:
    """The Hugging Face key of a cljax CLIP param path and the transform (``linear``, ``conv``, ``none``)."""
    parts = path.split("/")
    out = []
    for p in parts:
        if p.startswith("layers_") and p[7:].isdigit():
            out += ["layers", p[7:]]
        else:
            out.append(p)
    if out[0] in ("vision_model", "text_model") and out[1] in (
        "class_embedding",
        "position_embedding",
        "patch_embedding",
        "token_embedding",
    ):
        out.insert(1, "embeddings")
    last = out[-1]
    kind = "none"
    if last == "kernel":
        kind = "conv" if out[-2] == "patch_embedding" else "linear"
        out[-1] = "weight"
    elif last in ("scale", "embedding"):
        out[-1] = "weight"
    elif path == "vision_model/position_embedding":
        out.append("weight")
    return ".".join(out), kind


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def _from_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "conv":
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return x


def _abstract_params(model) -> Any:
    c = model.config
    vc = c.vision
    images = jax.ShapeDtypeStruct((1, vc.image_size, vc.image_size, 3), np.float32)
    if isinstance(model, CLIP):
        ids = jax.ShapeDtypeStruct((1, c.text.max_position_embeddings), np.int32)
        shapes = jax.eval_shape(model.init, jax.random.key(0), images, ids)
    else:
        shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    return shapes["params"]


def from_hf_state_dict(
    state: Mapping[str, np.ndarray], model: CLIP | CLIPImageEncoder, *, dtype=None
) -> Any:
    """Converts a Hugging Face CLIP state dict (numpy arrays) to the params of ``model``.

    Args:
      state: key -> array, as read from ``model.safetensors``.
      model: a :class:`CLIP` (full checkpoint) or :class:`CLIPImageEncoder` (vision only;
        text keys in ``state`` are then ignored).
      dtype: cast floating leaves to this dtype (default: keep the checkpoint's).

    Returns:
      A params pytree (``{"vision_model": ..., ...}``) for ``model.apply({"params": p}, ...)``.

    Raises:
      CheckpointMismatchError: listing every missing key, unexpected key and wrong shape.
    """
    abstract = _abstract_params(model)
    expected = {}
    for path, leaf in ct.leaves_with_paths(abstract):
        key, kind = hf_key(path)
        expected[key] = (path, kind, tuple(leaf.shape))
    vision_only = isinstance(model, CLIPImageEncoder)
    missing = sorted(set(expected) - set(state))
    extra = sorted(
        k
        for k in state
        if k not in expected
        and not k.endswith(_SKIPPED)
        and not (
            vision_only
            and (k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale"))
        )
    )
    wrong = []
    flat = {}
    for key, (path, kind, shape) in expected.items():
        if key not in state:
            continue
        arr = _from_hf(np.asarray(state[key]), kind)
        if arr.shape != shape:
            wrong.append(
                f"{key}: checkpoint {tuple(np.shape(state[key]))}, model expects {_to_hf(np.zeros(shape), kind).shape}"
            )
            continue
        flat[path] = (
            arr if dtype is None or not np.issubdtype(arr.dtype, np.floating) else arr.astype(dtype)
        )
    if missing or extra or wrong:
        msg = ["state (the checkpoint's state dict) does not fit the CLIP model:"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {missing}")
        if extra:
            msg.append(f"  unexpected keys ({len(extra)}): {extra}")
        if wrong:
            msg.append(f"  wrong shapes ({len(wrong)}): {wrong}")
        raise CheckpointMismatchError("\n".join(msg))
    leaves = [flat[p] for p in ct.paths(abstract)]
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def to_hf_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Converts cljax CLIP params (full or image encoder) to a Hugging Face state dict."""
    return {
        hf_key(p)[0]: _to_hf(np.asarray(x), hf_key(p)[1]) for p, x in ct.leaves_with_paths(params)
    }


def load_hf_safetensors(
    path: str | os.PathLike, model: CLIP | CLIPImageEncoder, *, dtype=None
) -> Any:
    """Reads a Hugging Face ``model.safetensors`` (file or folder) into params of ``model``.

    Raises:
      FileNotFoundError: if no file is there.
      CheckpointMismatchError: if keys or shapes do not fit (all listed).
      cljax.safetensors.SafetensorsError: if the file is corrupt (names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    return from_hf_state_dict(st.load(path), model, dtype=dtype)


def config_to_hf(config: CLIPConfig) -> dict:
    """A Hugging Face ``CLIPConfig`` dict (``config.json``) for a cljax config."""
    v, t = config.vision, config.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.projection_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "hidden_act": v.hidden_act,
            "layer_norm_eps": v.layer_norm_eps,
            "projection_dim": config.projection_dim,
            "num_channels": 3,
        },
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "hidden_act": t.hidden_act,
            "layer_norm_eps": t.layer_norm_eps,
            "projection_dim": config.projection_dim,
            "eos_token_id": t.eos_token_id,
        },
    }


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
    """A cljax :class:`CLIPConfig` from a Hugging Face ``config.json`` dict."""
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    vision = CLIPVisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        hidden_size=v.get("hidden_size", 768),
        intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12),
        num_heads=v.get("num_attention_heads", 12),
        hidden_act=v.get("hidden_act", "quick_gelu"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
    )
    text = CLIPTextConfig(
        vocab_size=t.get("vocab_size", 49408),
        max_position_embeddings=t.get("max_position_embeddings", 77),
        hidden_size=t.get("hidden_size", 512),
        intermediate_size=t.get("intermediate_size", 2048),
        num_layers=t.get("num_hidden_layers", 12),
        num_heads=t.get("num_attention_heads", 8),
        hidden_act=t.get("hidden_act", "quick_gelu"),
        layer_norm_eps=t.get("layer_norm_eps", 1e-5),
        eos_token_id=t.get("eos_token_id", 2),
    )
    return CLIPConfig(
        vision=vision,
        text=text,
        projection_dim=hf.get("projection_dim", 512),
        logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
    )


def save_hf_pretrained(params: Any, config: CLIPConfig, directory: str | os.PathLike) -> Path:
    """Writes ``model.safetensors`` and ``config.json`` that ``CLIPModel.from_pretrained`` loads.

    Files are written under temporary names and renamed into place.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    st.save(directory / "model.safetensors", to_hf_state_dict(params), metadata={"format": "pt"})
    ctmp = directory / "config.json.part"
    ctmp.write_text(json.dumps(config_to_hf(config), indent=2))
    os.replace(ctmp, directory / "config.json")
    return directory
