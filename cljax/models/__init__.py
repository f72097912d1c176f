"""Flax (linen) models: ``num_classes=None`` gives the encoder, an int adds a ``head``.

CLIP (Hugging Face layout, converters, zero-shot heads) is in :mod:`cljax.models.clip`.
"""

from cljax.models import clip
from cljax.models._clip import CLIP, CLIPImageEncoder, clip_config
from cljax.models._lenet import LeNet
from cljax.models._mlp import MLP
from cljax.models._resnet import BasicBlock, ResNet, ResNet18
from cljax.models._vit import ViT

__all__ = [
    "CLIP",
    "MLP",
    "BasicBlock",
    "CLIPImageEncoder",
    "LeNet",
    "ResNet",
    "ResNet18",
    "ViT",
    "clip",
    "clip_config",
]
