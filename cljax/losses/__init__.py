"""cljax.losses (in progress)."""

from cljax.losses._entropy import entropy, entropy_loss, pseudo_label_loss

__all__ = [
    "entropy",
    "entropy_loss",
    "pseudo_label_loss",
]
