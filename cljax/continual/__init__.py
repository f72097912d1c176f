"""Continual learning: a task-sequence runner, the accuracy matrix and the field's metrics.

The runner (:func:`run_sequence`) trains on tasks one after another with pure hooks
(``begin_task``, the train loop, ``end_task``) of method objects, evaluates every task after
every task into the accuracy matrix ``A[j, i]`` (after task j, on task i), and checkpoints
its whole state at task boundaries. The metrics read that matrix.
"""

from cljax.continual._methods import EWC, GPM, OSFT, PRD, CoSO, L2Anchor, LwF, Naive, no_task_loss
from cljax.continual._metrics import (
    average_incremental_accuracy,
    backward_transfer,
    final_average_accuracy,
    forgetting,
    forward_transfer,
    mtil_avg,
    mtil_last,
    mtil_transfer,
    summarize,
)
from cljax.continual._runner import (
    ContinualResult,
    HeadLayout,
    Method,
    TaskContext,
    cross_entropy_loss,
    run_sequence,
)

__all__ = [
    "EWC",
    "GPM",
    "OSFT",
    "PRD",
    "CoSO",
    "ContinualResult",
    "HeadLayout",
    "L2Anchor",
    "LwF",
    "Method",
    "Naive",
    "TaskContext",
    "cross_entropy_loss",
    "no_task_loss",
    "run_sequence",
    "average_incremental_accuracy",
    "backward_transfer",
    "final_average_accuracy",
    "forgetting",
    "forward_transfer",
    "mtil_avg",
    "mtil_last",
    "mtil_transfer",
    "summarize",
]
