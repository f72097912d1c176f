"""Choosing the merge coefficient λ on validation data (Ilharco et al., 2023)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cljax._checks import check_scalar

__all__ = ["DEFAULT_GRID", "select_scale"]

#: The task-arithmetic protocol's grid: λ ∈ {0, 0.05, …, 1.0}.
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))


def select_scale(
    evaluate: Callable[[float], float],
    grid: Sequence[float] | None = None,
    *,
    maximize: bool = True,
) -> tuple[float, np.ndarray]:
    """Picks the scale λ with the best validation score on a grid.

    Args:
      evaluate: ``scale -> score`` on held-out validation data (e.g. mean normalised
        accuracy of ``task_arithmetic(theta0, taus, scale)``); for speed, build the merge
        inside a jitted function that takes the scale as an argument (no recompilation).
      grid: candidate scales; default :data:`DEFAULT_GRID` (0 to 1 by 0.05, the protocol of
        task arithmetic). TIES with ``merge="mean"`` uses 0.8 to 2.5 by 0.1.
      maximize: pick the largest score (``False``: the smallest, e.g. target accuracy for
        task negation).

    Returns:
      ``(best_scale, scores)``: the first grid point with the best score, and the scores in
      grid order. NaN scores never win.

    Raises:
      ValueError: on an empty grid, a grid point that is not a finite real number, or if
        every score is NaN.

    Example:
      >>> lam, scores = select_scale(lambda s: val_acc(task_arithmetic(t0, taus, s)))

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    """
    grid = list(DEFAULT_GRID if grid is None else grid)
    if not grid:
        raise ValueError("select_scale: grid is empty; give at least one scale")
    for i, s in enumerate(grid):
        check_scalar(s, name=f"grid[{i}]", where="select_scale")
    scores = np.array([float(evaluate(s)) for s in grid], dtype=np.float64)
    if np.isnan(scores).all():
        raise ValueError(f"select_scale: every score is NaN on grid {grid}")
    keyed = np.where(np.isnan(scores), -np.inf, scores if maximize else -scores)
    return grid[int(np.argmax(keyed))], scores
