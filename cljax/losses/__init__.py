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
