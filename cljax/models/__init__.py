"""Flax models."""

from cljax.models import clip
from cljax.models._clip import CLIP, CLIPImageEncoder, clip_config

__all__ = ["CLIP", "CLIPImageEncoder", "clip", "clip_config"]
