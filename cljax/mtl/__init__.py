"""Multi-task learning: per-task gradients, their aggregators, loss weightings, SAM and F-MTL.

Aggregators take a stacked tree of per-task gradients of the shared parameters (leading
axis T, or a list of T trees) and return one gradient tree; they are pure and jit-able and
share one signature ``aggregator(task_grads, *, key=None, **hyperparameters)``. Each
docstring states its scale convention (mean or sum). Gram-based ones compute the T×T Gram
matrix of global dot products once, in float32.

Inside optax, :func:`aggregate` wraps any aggregator as the first transformation of a
chain: it takes the stacked per-task gradients of :func:`task_grad_fn` (or F-MTL's
:func:`fmtl_grad_fn`) and keeps the aggregator's PRNG key in its state.
"""

from cljax.mtl._aggregate import AggregateState, FMTLGrads, aggregate
from cljax.mtl._aligned import aligned_mtl
from cljax.mtl._cagrad import cagrad
from cljax.mtl._fmtl import fmtl, fmtl_grad_fn, mtl_grad_fn, task_grad_fn
from cljax.mtl._graddrop import graddrop
from cljax.mtl._gram import combine, gram
from cljax.mtl._harness import (
    HEAD_RULES,
    MultiHead,
    classification_losses,
    delta_m,
    evaluate_accuracy,
    make_mtl_step,
    multitask_batch,
)
from cljax.mtl._imtl import imtl_g
from cljax.mtl._linear import linear
from cljax.mtl._mgda import mgda
from cljax.mtl._nash import nash_mtl
from cljax.mtl._pcgrad import pcgrad
from cljax.mtl._per_task import TaskGrads, head_mask, per_task_grads
from cljax.mtl._rep_mtl import (
    rep_mtl_loss_fn,
    rep_mtl_regularizer,
    saliency_alignment,
    saliency_entropy,
    task_saliency,
)
from cljax.mtl._sam import sam_gradient, sam_perturbation
from cljax.mtl._weighting import (
    DWAState,
    LossWeighting,
    UWState,
    dwa,
    random_loss_weighting,
    uncertainty_weighting,
)

__all__ = [
    "AggregateState",
    "DWAState",
    "FMTLGrads",
    "HEAD_RULES",
    "LossWeighting",
    "MultiHead",
    "TaskGrads",
    "UWState",
    "aggregate",
    "aligned_mtl",
    "cagrad",
    "classification_losses",
    "combine",
    "delta_m",
    "dwa",
    "evaluate_accuracy",
    "fmtl",
    "fmtl_grad_fn",
    "graddrop",
    "gram",
    "head_mask",
    "imtl_g",
    "linear",
    "make_mtl_step",
    "mgda",
    "mtl_grad_fn",
    "multitask_batch",
    "nash_mtl",
    "pcgrad",
    "per_task_grads",
    "random_loss_weighting",
    "rep_mtl_loss_fn",
    "rep_mtl_regularizer",
    "saliency_alignment",
    "saliency_entropy",
    "sam_gradient",
    "sam_perturbation",
    "task_grad_fn",
    "task_saliency",
    "uncertainty_weighting",
]
