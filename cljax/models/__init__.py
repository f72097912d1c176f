"""Flax (linen) models: ``num_classes=None`` gives the encoder, an int adds a ``head``."""

from cljax.models._lenet import LeNet
from cljax.models._mlp import MLP
from cljax.models._resnet import BasicBlock, ResNet, ResNet18
from cljax.models._vit import ViT

__all__ = ["MLP", "BasicBlock", "LeNet", "ResNet", "ResNet18", "ViT"]
