"""cljax.losses (in progress)."""

from cljax.losses._zscl import kd_loss, reference_embeddings, zscl_distillation  # noqa: E402, F401
