"""cljax.losses (in progress)."""

from cljax.losses._anchor import l2_anchor
from cljax.losses._ewc import EWCState, diagonal_fisher, ewc_penalty, ewc_update
from cljax.losses._lwf import lwf_distillation

__all__ = [
    "EWCState",
    "diagonal_fisher",
    "ewc_penalty",
    "ewc_update",
    "l2_anchor",
    "lwf_distillation",
]

from cljax.losses._zscl import kd_loss, reference_embeddings, zscl_distillation  # noqa: E402

__all__ += ["kd_loss", "reference_embeddings", "zscl_distillation"]
