"""CLIP for cljax: the Flax model, Hugging Face converters and zero-shot heads.

``from cljax.models import clip`` then ``clip.CLIP(clip.clip_config("ViT-B/32"))``,
``clip.load_hf_safetensors(path, model)``, ``clip.save_hf_pretrained(params, config, dir)``,
``clip.zero_shot_head(encode_text, classnames, clip.TEMPLATES["mnist"])``.
"""

from cljax.models._clip import (
    CLIP,
    CLIPConfig,
    CLIPImageEncoder,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    clip_config,
    quick_gelu,
)
from cljax.models._clip_convert import (
    CheckpointMismatchError,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    hf_key,
    load_hf_safetensors,
    save_hf_pretrained,
    to_hf_state_dict,
)
from cljax.models._embedded import (
    PretrainedCLIP,
    embedded_checkpoint,
    image_encoder_params,
    load_pretrained,
    normalize_images,
)
from cljax.models._heads import TEMPLATES, head_logits, zero_shot_head
from cljax.models._tokenizer import CLIPTokenizer, train_bpe

__all__ = [
    "CLIP",
    "TEMPLATES",
    "CLIPConfig",
    "CLIPImageEncoder",
    "CLIPTextConfig",
    "CLIPTokenizer",
    "CLIPTextModel",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CheckpointMismatchError",
    "PretrainedCLIP",
    "clip_config",
    "config_from_hf",
    "config_to_hf",
    "embedded_checkpoint",
    "from_hf_state_dict",
    "head_logits",
    "hf_key",
    "image_encoder_params",
    "load_hf_safetensors",
    "load_pretrained",
    "normalize_images",
    "quick_gelu",
    "save_hf_pretrained",
    "to_hf_state_dict",
    "train_bpe",
    "zero_shot_head",
]
