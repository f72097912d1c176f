import numpy as np
import pytest

from cljax.merging import DEFAULT_GRID, select_scale


def test_default_grid_is_the_protocols():
    assert len(DEFAULT_GRID) == 21 and DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0
    np.testing.assert_allclose(np.diff(DEFAULT_GRID), 0.05)


def test_select_scale_picks_the_best():
    best, scores = select_scale(lambda s: -((s - 0.35) ** 2))
    assert best == 0.35
    np.testing.assert_allclose(scores, [-((s - 0.35) ** 2) for s in DEFAULT_GRID])
    best, _ = select_scale(lambda s: (s - 0.35) ** 2, [0.2, 0.3, 0.4], maximize=False)
    assert best == 0.3  # 0.3 and 0.4 tie up to rounding; the earlier wins only if equal
    best, _ = select_scale(lambda s: 1.0, [0.5, 0.1, 0.9])
    assert best == 0.5  # first of equal scores


def test_select_scale_nan_and_errors():
    best, scores = select_scale(lambda s: float("nan") if s > 0.5 else s, [0.2, 0.9, 0.4])
    assert best == 0.4 and np.isnan(scores[1])
    with pytest.raises(ValueError, match="grid is empty"):
        select_scale(lambda s: s, [])
    with pytest.raises(ValueError, match="every score is NaN"):
        select_scale(lambda s: float("nan"), [0.1])
