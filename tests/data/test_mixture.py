"""Data mixtures: schedule pieces, largest-remainder counts (brute force), deterministic batches."""

import itertools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.data import (
    MixedBatcher,
    Task,
    mixed_batch_at,
    mixed_batch_counts,
    mixture_schedule,
)


def _brute_force_counts(weights, batch_size):
    """Largest remainder by enumeration: of all integer vectors summing to the batch size that
    round each exact quota down or up, the one whose rounded-up tasks hold the largest total
    remainder; among equals, the one rounding up the lexicographically smallest index set."""
    w = [Fraction(float(x)) for x in weights]
    q = [x * batch_size / sum(w) for x in w]
    best = None
    for ups in itertools.product((0, 1), repeat=len(q)):
        c = [math.floor(qi) + u for qi, u in zip(q, ups, strict=True)]
        if sum(c) != batch_size or any(
            u and qi == math.floor(qi) for qi, u in zip(q, ups, strict=True)
        ):
            continue
        gain = sum(qi - math.floor(qi) for qi, u in zip(q, ups, strict=True) if u)
        chosen = tuple(i for i, u in enumerate(ups) if u)
        key = (-gain, chosen)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def test_counts_sum_to_batch_and_match_brute_force(rng):
    cases = [([1, 1, 1], 8), ([1, 1, 1], 4), ([0.5, 0.25, 0.25], 7), ([3, 0, 1], 5), ([1], 3)]
    for _ in range(200):
        t = int(rng.integers(1, 6))
        w = rng.random(t) * (rng.random(t) > 0.2)
        if w.sum() == 0:
            w[0] = 1.0
        if rng.random() < 0.3:  # exact ties
            w = np.round(w * 4) + (w.sum() == 0)
            if w.sum() == 0:
                w[0] = 1.0
        cases.append((w.tolist(), int(rng.integers(1, 40))))
    for w, b in cases:
        c = mixed_batch_counts(w, b)
        assert c.sum() == b and c.dtype == np.int64
        np.testing.assert_array_equal(c, _brute_force_counts(w, b), err_msg=f"{w=} {b=}")
        assert np.all(c[np.asarray(w) == 0] == 0)


def test_counts_hand_worked():
    np.testing.assert_array_equal(mixed_batch_counts([1, 1, 1], 8), [3, 3, 2])  # tie: low index
    np.testing.assert_array_equal(mixed_batch_counts([1, 1, 1], 4), [2, 1, 1])
    np.testing.assert_array_equal(mixed_batch_counts([0.7, 0.2, 0.1], 10), [7, 2, 1])
    np.testing.assert_array_equal(mixed_batch_counts([5, 3], 3), [2, 1])  # 1.875, 1.125


def test_schedule_pieces_and_boundaries():
    s = mixture_schedule({1000: [1, 3], 0: [2, 2], 500: [1, 0]})
    assert s.boundaries == (0, 500, 1000)
    np.testing.assert_allclose(s(0), [0.5, 0.5])
    np.testing.assert_allclose(s(499), [0.5, 0.5])
    np.testing.assert_allclose(s(500), [1.0, 0.0])
    np.testing.assert_allclose(s(999), [1.0, 0.0])
    np.testing.assert_allclose(s(1000), [0.25, 0.75])
    np.testing.assert_allclose(s(10**9), [0.25, 0.75])
    # traced steps give the same pieces
    for step in (0, 499, 500, 999, 1000, 5000):
        np.testing.assert_allclose(jax.jit(s)(jnp.int32(step)), s(step), rtol=1e-6)
    # pairs work as well as a mapping
    np.testing.assert_allclose(mixture_schedule([(0, [1, 1]), (10, [0, 2])])(10), [0, 1])


def _tasks():
    def task(name, n, offset):
        x = (np.arange(n, dtype=np.float32)[:, None] + offset) * np.ones((1, 3), np.float32)
        y = np.arange(n, dtype=np.int32) % 2
        return Task(name, ("a", "b"), x, y, x[:2], y[:2], x[:2], y[:2])

    return (task("a", 13, 0), task("b", 7, 1000), task("c", 5, 2000))


def test_batches_follow_the_counts_and_are_deterministic():
    tasks = _tasks()
    sched = mixture_schedule({0: [2, 1, 1], 6: [0, 1, 3]})
    b = MixedBatcher(tasks, 8, sched, seed=3)
    for step in range(12):
        batch = b.batch_at(step)
        assert batch["x"].shape == (8, 3) and batch["y"].shape == (8,)
        counts = np.bincount(batch["task"], minlength=3)
        np.testing.assert_array_equal(counts, mixed_batch_counts(sched(step), 8))
        # the examples come from the right tasks
        np.testing.assert_array_equal(batch["x"][:, 0] // 1000, batch["task"])
        again = mixed_batch_at(tasks, step, 8, sched, 3)
        for k in batch:
            np.testing.assert_array_equal(batch[k], again[k])
    assert not np.array_equal(
        b.batch_at(1)["x"], MixedBatcher(tasks, 8, sched, seed=4).batch_at(1)["x"]
    )


def test_streams_are_epochs_without_replacement_and_resume_identically():
    tasks = _tasks()
    sched = mixture_schedule({0: [1, 1, 2], 4: [3, 1, 0]})
    b = MixedBatcher(tasks, 6, sched, seed=0)
    full = list(b.batches(steps=20))
    resumed = list(b.batches(start=9, steps=11))
    for x, y in zip(full[9:], resumed, strict=True):
        np.testing.assert_array_equal(x["x"], y["x"])
    # each task's examples, in order over the steps, run through whole epochs of its data
    for t, task in enumerate(tasks):
        seen = np.concatenate([bt["x"][bt["task"] == t, 0] for bt in full]) - 1000 * t
        n = len(task.y_train)
        for e in range(len(seen) // n):
            np.testing.assert_array_equal(np.sort(seen[e * n : (e + 1) * n]), np.arange(n))


def test_fixed_weights_schedule():
    tasks = _tasks()
    batch = mixed_batch_at(tasks, 5, 10, [1, 1, 0])
    np.testing.assert_array_equal(np.bincount(batch["task"], minlength=3), [5, 5, 0])


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"must include 0"):
        mixture_schedule({5: [1, 1]})
    with pytest.raises(ValueError, match=r"must be non-negative"):
        mixture_schedule({0: [1, -1]})
    with pytest.raises(ValueError, match=r"must be finite"):
        mixture_schedule({0: [1, float("nan")]})
    with pytest.raises(ValueError, match=r"must sum to more than 0"):
        mixture_schedule({0: [0, 0]})
    with pytest.raises(ValueError, match=r"different lengths"):
        mixture_schedule({0: [1, 1], 3: [1, 1, 1]})
    with pytest.raises(ValueError, match=r"step=-1 must be a non-negative int"):
        mixture_schedule({0: [1], -1: [1]})
    with pytest.raises(
        ValueError, match=r"mixed_batch_counts: batch_size=0 must be an integer >= 1"
    ):
        mixed_batch_counts([1, 1], 0)
    with pytest.raises(ValueError, match=r"batch_size=nan must be an integer"):
        mixed_batch_counts([1, 1], float("nan"))
    with pytest.raises(ValueError, match=r"must be finite"):
        mixed_batch_counts([1, float("inf")], 4)
    with pytest.raises(ValueError, match=r"MixedBatcher: seed=-1 must be an integer >= 0"):
        MixedBatcher(_tasks(), 4, [1, 1, 1], seed=-1)
    # weight 0.02 of a batch of 32: a quota of 0.64 that loses the remainder contest
    with pytest.raises(
        ValueError,
        match=r"task 'c' has weight 0.02 from step 5 but gets 0 of batch_size=32.*at least 50",
    ):
        MixedBatcher(_tasks(), 32, mixture_schedule({0: [1, 1, 1], 5: [0.49, 0.49, 0.02]}))
    MixedBatcher(_tasks(), 50, mixture_schedule({0: [1, 1, 1], 5: [0.49, 0.49, 0.02]}))
    with pytest.raises(ValueError, match=r"MixedBatcher: batch_size=2.5 must be an integer"):
        MixedBatcher(_tasks(), 2.5, [1, 1, 1])
    with pytest.raises(ValueError, match=r"weighs 2 tasks but 3 tasks"):
        MixedBatcher(_tasks(), 4, mixture_schedule({0: [1, 1]}))
    with pytest.raises(ValueError, match=r"batch_at: step=-2 must be an integer >= 0"):
        mixed_batch_at(_tasks(), -2, 4, [1, 1, 1])
    a = _tasks()[0]
    odd = Task(
        "odd",
        ("a", "b"),
        np.zeros((4, 2), np.float32),
        np.zeros(4, np.int32),
        *([np.zeros((1, 2), np.float32), np.zeros(1, np.int32)] * 2),
    )
    with pytest.raises(ValueError, match=r"task 'odd' has inputs"):
        MixedBatcher((a, odd), 4, [1, 1])


def test_docs_page_code_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "data-mixtures.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/data-mixtures.md", "exec"), {})
