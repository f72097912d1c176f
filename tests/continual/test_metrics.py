"""Continual-learning metrics against hand-computed matrices and slow loop references."""

import numpy as np
import pytest

from cljax import continual as cl

# After task j (row), on task i (column); a hand-worked 3-task example.
A = np.array(
    [
        [0.90, 0.20, 0.10],
        [0.70, 0.80, 0.30],
        [0.60, 0.85, 0.95],
    ]
)


def test_hand_computed_values():
    assert cl.final_average_accuracy(A) == pytest.approx((0.60 + 0.85 + 0.95) / 3)
    assert cl.average_incremental_accuracy(A) == pytest.approx(
        (0.90 + (0.70 + 0.80) / 2 + (0.60 + 0.85 + 0.95) / 3) / 3
    )
    # BWT: (0.60 - 0.90 + 0.85 - 0.80) / 2
    assert cl.backward_transfer(A) == pytest.approx(-0.125)
    # forgetting: task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: 0.80 - 0.85 = -0.05
    assert cl.forgetting(A) == pytest.approx(0.125)
    # FWT: (A[0,1] - 0.1 + A[1,2] - 0.1) / 2
    assert cl.forward_transfer(A, [0.1, 0.1, 0.1]) == pytest.approx((0.1 + 0.2) / 2)
    # MTIL: Transfer = mean(A[0,1], mean(A[0,2], A[1,2]))
    assert cl.mtil_transfer(A) == pytest.approx((0.20 + (0.10 + 0.30) / 2) / 2)
    assert cl.mtil_avg(A) == pytest.approx(
        np.mean([(0.9 + 0.7 + 0.6) / 3, (0.2 + 0.8 + 0.85) / 3, (0.1 + 0.3 + 0.95) / 3])
    )
    assert cl.mtil_last(A) == cl.final_average_accuracy(A)


def _slow(a, b):
    t = len(a)
    bwt = sum(a[t - 1][i] - a[i][i] for i in range(t - 1)) / (t - 1)
    forg = sum(max(a[l][i] for l in range(i, t - 1)) - a[t - 1][i] for i in range(t - 1)) / (t - 1)
    fwt = sum(a[i - 1][i] - b[i] for i in range(1, t)) / (t - 1)
    transfer = sum(sum(a[j][i] for j in range(i)) / i for i in range(1, t)) / (t - 1)
    avg = sum(sum(a[j][i] for j in range(t)) / t for i in range(t)) / t
    inc = sum(sum(a[j][i] for i in range(j + 1)) / (j + 1) for j in range(t)) / t
    return {
        "bwt": bwt,
        "forgetting": forg,
        "fwt": fwt,
        "mtil_transfer": transfer,
        "mtil_avg": avg,
        "avg_incremental": inc,
        "acc": sum(a[t - 1]) / t,
    }


@pytest.mark.parametrize("t", [2, 3, 7])
def test_summarize_matches_loops(rng, t):
    a = rng.uniform(size=(t, t))
    b = rng.uniform(size=t)
    got = cl.summarize(a, baseline=b)
    want = _slow(a.tolist(), b.tolist())
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert got["mtil_last"] == pytest.approx(want["acc"])


def test_forgetting_is_at_least_minus_bwt(rng):
    a = rng.uniform(size=(5, 5))
    assert cl.forgetting(a) >= -cl.backward_transfer(a) - 1e-12


def test_single_task_summary_has_no_transfer_metrics():
    s = cl.summarize([[0.5]])
    assert s == {"acc": 0.5, "avg_incremental": 0.5, "mtil_avg": 0.5, "mtil_last": 0.5}


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"must be square"):
        cl.final_average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"at least 2 task"):
        cl.backward_transfer([[0.5]])
    with pytest.raises(ValueError, match=r"needs at least 1 task"):
        cl.final_average_accuracy(np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"non-finite"):
        cl.mtil_avg([[np.nan, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"baseline has shape \(3,\)"):
        cl.forward_transfer(np.eye(2), [0.1, 0.1, 0.1])
