"""cljax.losses (in progress)."""

from cljax.losses._entropy import entropy, entropy_loss, pseudo_label_loss
from cljax.losses._zscl import kd_loss, reference_embeddings, zscl_distillation

__all__ = [
    "entropy",
    "entropy_loss",
    "kd_loss",
    "pseudo_label_loss",
    "reference_embeddings",
    "zscl_distillation",
]
