"""cljax.models (in progress)."""

from cljax.models._resnet import BasicBlock, ResNet, ResNet18  # noqa: E402

__all__ = ["BasicBlock", "ResNet", "ResNet18"]
