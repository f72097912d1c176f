"""Continual learning: a task-sequence runner, the accuracy matrix and the field's metrics.

The runner (:func:`run_sequence`) trains on tasks one after another, evaluates every task
after every task into the accuracy matrix ``A[j, i]`` (after task j, on task i), and
checkpoints its whole state at task boundaries. Methods are :class:`Method` NamedTuples of
pure hooks (``init``, ``update``, ``loss``, ``begin_task``, ``end_task``, ...) built by
factories (:func:`ewc`, :func:`lwf`, :func:`gpm`, ...), the protocol of every stateful
method (:mod:`cljax.stateful`). The metrics read the matrix.
"""

from cljax.continual._methods import (
    AnchorState,
    TeacherState,
    coso,
    ewc,
    gpm,
    l2_anchor,
    lwf,
    naive,
    no_task_loss,
    osft,
    prd,
)
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
    "AnchorState",
    "ContinualResult",
    "HeadLayout",
    "Method",
    "TaskContext",
    "TeacherState",
    "coso",
    "cross_entropy_loss",
    "ewc",
    "gpm",
    "l2_anchor",
    "lwf",
    "naive",
    "no_task_loss",
    "osft",
    "prd",
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
