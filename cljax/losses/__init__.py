"""cljax.losses (in progress)."""

from cljax.losses._anchor import l2_anchor
from cljax.losses._entropy import entropy, entropy_loss, pseudo_label_loss
from cljax.losses._ewc import EWCState, diagonal_fisher, ewc_penalty, ewc_update
from cljax.losses._lwf import lwf_distillation
from cljax.losses._zscl import kd_loss, reference_embeddings, zscl_distillation

__all__ = [
    "EWCState",
    "diagonal_fisher",
    "entropy",
    "entropy_loss",
    "ewc_penalty",
    "ewc_update",
    "kd_loss",
    "l2_anchor",
    "lwf_distillation",
    "pseudo_label_loss",
    "reference_embeddings",
    "zscl_distillation",
]
