import numpy as np
import pytest

from cljax.data import Task, load_digits, load_mnist1d, load_mnist5k, split_train_val


def _task(n=50, classes=3):
    rs = np.random.default_rng(0)
    x = rs.normal(size=(n, 4)).astype(np.float32)
    y = rs.integers(0, classes, size=n).astype(np.int32)
    return Task("t", tuple("abc"[:classes]), x, y, x[:10], y[:10], x[:10], y[:10])


def test_sources_are_real_and_offline():
    x, y = load_mnist5k()
    assert x.shape == (5000, 28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
    xd, yd = load_digits()
    assert xd.shape == (1797, 8, 8) and yd.max() == 9
    x1, y1 = load_mnist1d(num_samples=500)
    assert x1.shape == (500, 40) and set(np.unique(y1)) <= set(range(10))


def test_batches_are_deterministic_and_cover_each_epoch():
    t = _task()
    spe = t.steps_per_epoch(8)
    assert spe == 6
    a = [b["x"] for b in t.batches(8, seed=1, steps=2 * spe)]
    b = [t.batch_at(s, 8, seed=1)["x"] for s in range(2 * spe)]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    seen = np.concatenate([t.batch_at(s, 8, seed=1)["y"] for s in range(spe)])
    assert len(seen) == 48
    # resuming from step k gives the same stream
    resumed = [x["x"] for x in t.batches(8, seed=1, start=4, steps=3)]
    for u, v in zip(resumed, a[4:7], strict=True):
        np.testing.assert_array_equal(u, v)
    # a different seed shuffles differently
    assert not np.array_equal(t.batch_at(0, 8, seed=2)["x"], a[0])


def test_task_bad_input():
    t = _task()
    with pytest.raises(ValueError, match="exceeds"):
        t.steps_per_epoch(1000)
    with pytest.raises(ValueError, match="split"):
        t.split("dev")
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="labels span"):
        Task("bad", ("a", "b"), x, np.array([0, 1, 2, 0]), x, np.zeros(4, int), x, np.zeros(4, int))


def test_split_train_val():
    x = np.arange(100)
    (xt, yt), (xv, yv) = split_train_val(x, x, fraction=0.1, seed=0)
    assert len(xv) == 10 and len(xt) == 90 and not set(xv) & set(xt)
    (_, _), (xv2, _) = split_train_val(x, x, fraction=0.5, max_val=7)
    assert len(xv2) == 7
    with pytest.raises(ValueError, match="fraction"):
        split_train_val(x, x, fraction=1.5)
