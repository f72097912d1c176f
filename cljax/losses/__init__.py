"""Loss terms added to the task loss: anchors, EWC, distillation (LwF, ZSCL), entropy."""

from cljax.losses._anchor import l2_anchor
from cljax.losses._dann import dann_schedule, domain_adversarial_loss, grad_reverse
from cljax.losses._entropy import entropy, entropy_loss, pseudo_label_loss
from cljax.losses._ewc import EWCState, diagonal_fisher, ewc_next_task, ewc_penalty
from cljax.losses._logit_fusion import dynamic_logit_fusion, logit_arithmetic
from cljax.losses._logit_swap import logit_swap_distillation, swap_top_logit
from cljax.losses._lwf import lwf_distillation
from cljax.losses._relation import (
    prototype_loss,
    relation_distillation,
    supervised_contrastive_loss,
)
from cljax.losses._zscl import kd_loss, reference_embeddings, zscl_distillation

__all__ = [
    "EWCState",
    "dann_schedule",
    "diagonal_fisher",
    "domain_adversarial_loss",
    "dynamic_logit_fusion",
    "entropy",
    "entropy_loss",
    "ewc_penalty",
    "ewc_next_task",
    "grad_reverse",
    "kd_loss",
    "l2_anchor",
    "logit_arithmetic",
    "logit_swap_distillation",
    "lwf_distillation",
    "prototype_loss",
    "pseudo_label_loss",
    "reference_embeddings",
    "relation_distillation",
    "supervised_contrastive_loss",
    "swap_top_logit",
    "zscl_distillation",
]
