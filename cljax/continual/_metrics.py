"""Continual-learning metrics from the accuracy matrix ``A[j, i]`` (after task j, on task i).

All functions take the full ``T x T`` matrix a runner produces (it evaluates every task after
every task, so the entries above the diagonal -- tasks not trained yet -- are there too; they
are what forward transfer and MTIL's *Transfer* read). Entries may be fractions or
percentages; the metrics keep the unit of the input. They run on the host (numpy) and
return Python floats.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = [
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


def _check(acc: jax.typing.ArrayLike, *, min_tasks: int = 1, name: str = "metric") -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(
            f"{name}: the accuracy matrix must be square [T, T] (after task j, on task i); "
            f"got shape {a.shape}"
        )
    if a.shape[0] < min_tasks:
        raise ValueError(f"{name}: needs at least {min_tasks} task(s); got T={a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: the accuracy matrix holds non-finite entries")
    return a


def final_average_accuracy(acc: jax.typing.ArrayLike) -> float:
    """ACC: mean accuracy over all tasks after the last task, ``mean_i A[T-1, i]``.

    Args:
      acc: accuracy matrix ``[T, T]``, ``acc[j, i]`` = accuracy on task i after training task j.

    Returns:
      The final average accuracy.

    Raises:
      ValueError: if ``acc`` is not a finite square matrix with ``T >= 1``.

    Example::

      >>> final_average_accuracy([[0.5, 0.25], [0.75, 1.0]])
      0.875

    References:
      Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    """
    a = _check(acc, name="final_average_accuracy")
    return float(a[-1].mean())


def average_incremental_accuracy(acc: jax.typing.ArrayLike) -> float:
    """Mean over steps j of the average accuracy on the tasks seen so far, ``mean_{i<=j} A[j, i]``.

    Args:
      acc: accuracy matrix ``[T, T]``.

    Returns:
      ``(1/T) sum_j (1/(j+1)) sum_{i<=j} A[j, i]``.

    Raises:
      ValueError: on a malformed matrix.

    Example::

      >>> average_incremental_accuracy([[0.5, 0.25], [0.75, 1.0]])
      0.6875

    References:
      Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017.
    """
    a = _check(acc, name="average_incremental_accuracy")
    return float(np.mean([a[j, : j + 1].mean() for j in range(a.shape[0])]))


def backward_transfer(acc: jax.typing.ArrayLike) -> float:
    """BWT: ``mean_{i<T-1} (A[T-1, i] - A[i, i])``; negative values measure forgetting.

    Args:
      acc: accuracy matrix ``[T, T]`` with ``T >= 2``.

    Returns:
      The backward transfer.

    Raises:
      ValueError: on a malformed matrix or ``T < 2``.

    Example::

      >>> backward_transfer([[0.5, 0.25], [0.25, 1.0]])
      -0.25

    References:
      Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    """
    a = _check(acc, min_tasks=2, name="backward_transfer")
    t = a.shape[0]
    return float(np.mean(a[-1, : t - 1] - np.diag(a)[: t - 1]))


def forgetting(acc: jax.typing.ArrayLike) -> float:
    """Average forgetting: ``mean_{i<T-1} max_{i<=l<T-1} A[l, i] - A[T-1, i]``.

    Args:
      acc: accuracy matrix ``[T, T]`` with ``T >= 2``.

    Returns:
      The average forgetting (>= BWT's negation, as the best past accuracy can exceed
      the one just after training the task).

    Raises:
      ValueError: on a malformed matrix or ``T < 2``.

    Example::

      >>> forgetting([[0.5, 0.0, 0.0], [0.75, 1.0, 0.0], [0.25, 1.0, 1.0]])
      0.25

    References:
      Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018.
    """
    a = _check(acc, min_tasks=2, name="forgetting")
    t = a.shape[0]
    return float(np.mean([a[i : t - 1, i].max() - a[-1, i] for i in range(t - 1)]))


def forward_transfer(acc: jax.typing.ArrayLike, baseline: jax.typing.ArrayLike) -> float:
    """FWT: ``mean_{i>=1} (A[i-1, i] - b_i)``, accuracy on a task before training it minus a baseline.

    Args:
      acc: accuracy matrix ``[T, T]`` with ``T >= 2``.
      baseline: ``[T]`` accuracies ``b_i`` of the reference model on each task (GEM uses a
        randomly initialised model; MTIL-style runs use the zero-shot model).

    Returns:
      The forward transfer.

    Raises:
      ValueError: on a malformed matrix, ``T < 2`` or a baseline of the wrong shape.

    Example::

      >>> forward_transfer([[0.5, 0.375], [0.75, 1.0]], [0.125, 0.125])
      0.25

    References:
      Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    """
    a = _check(acc, min_tasks=2, name="forward_transfer")
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (a.shape[0],):
        raise ValueError(
            f"forward_transfer: baseline has shape {b.shape}; expected ({a.shape[0]},)"
        )
    t = a.shape[0]
    return float(np.mean([a[i - 1, i] - b[i] for i in range(1, t)]))


def mtil_transfer(acc: jax.typing.ArrayLike) -> float:
    """MTIL *Transfer*: ``mean_{i>=1} mean_{j<i} A[j, i]``, accuracy on tasks not yet trained.

    Measures how much zero-shot ability survives on upcoming tasks (ZSCL, MTIL benchmark).

    Args:
      acc: accuracy matrix ``[T, T]`` with ``T >= 2``.

    Returns:
      The Transfer metric.

    Raises:
      ValueError: on a malformed matrix or ``T < 2``.

    Example::

      >>> mtil_transfer([[1.0, 0.5, 0.25], [1.0, 1.0, 0.75], [1.0, 1.0, 1.0]])
      0.5

    References:
      Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
      Vision-Language Models" (ZSCL), ICCV 2023.
    """
    a = _check(acc, min_tasks=2, name="mtil_transfer")
    return float(np.mean([a[:i, i].mean() for i in range(1, a.shape[0])]))


def mtil_avg(acc: jax.typing.ArrayLike) -> float:
    """MTIL *Avg*: ``mean_i mean_j A[j, i]``, every entry of the matrix counted once.

    Args:
      acc: accuracy matrix ``[T, T]``.

    Returns:
      The Avg metric.

    Raises:
      ValueError: on a malformed matrix.

    Example::

      >>> mtil_avg([[1.0, 0.0], [0.5, 0.5]])
      0.5

    References:
      Zheng et al., ZSCL, ICCV 2023.
    """
    a = _check(acc, name="mtil_avg")
    return float(a.mean(axis=0).mean())


def mtil_last(acc: jax.typing.ArrayLike) -> float:
    """MTIL *Last*: ``mean_i A[T-1, i]`` (the final average accuracy).

    Args:
      acc: accuracy matrix ``[T, T]``.

    Returns:
      The Last metric.

    Raises:
      ValueError: on a malformed matrix.

    Example::

      >>> mtil_last([[1.0, 0.0], [0.5, 0.75]])
      0.625

    References:
      Zheng et al., ZSCL, ICCV 2023.
    """
    _check(acc, name="mtil_last")
    return final_average_accuracy(acc)


def summarize(
    acc: jax.typing.ArrayLike, baseline: jax.typing.ArrayLike | None = None
) -> dict[str, float]:
    """All metrics of an accuracy matrix in one dict.

    Args:
      acc: accuracy matrix ``[T, T]``.
      baseline: optional ``[T]`` baseline accuracies for forward transfer.

    Returns:
      ``{"acc", "avg_incremental", "mtil_avg", "mtil_last"}`` and, for ``T >= 2``,
      ``{"bwt", "forgetting", "mtil_transfer"}`` and ``"fwt"`` when ``baseline`` is given.

    Raises:
      ValueError: on a malformed matrix or baseline.

    Example::

      >>> sorted(summarize([[0.5, 0.25], [0.75, 1.0]]))
      ['acc', 'avg_incremental', 'bwt', 'forgetting', 'mtil_avg', 'mtil_last', 'mtil_transfer']
    """
    a = _check(acc, name="summarize")
    out = {
        "acc": final_average_accuracy(a),
        "avg_incremental": average_incremental_accuracy(a),
        "mtil_avg": mtil_avg(a),
        "mtil_last": mtil_last(a),
    }
    if a.shape[0] >= 2:
        out["bwt"] = backward_transfer(a)
        out["forgetting"] = forgetting(a)
        out["mtil_transfer"] = mtil_transfer(a)
        if baseline is not None:
            out["fwt"] = forward_transfer(a, baseline)
    return out
