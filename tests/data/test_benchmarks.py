"""Tests of cljax.data.merging_benchmark and its image transforms."""

import numpy as np
import pytest

from cljax.data import load_digits, load_mnist5k, merging_benchmark
from cljax.data._benchmarks import (
    TARGETS,
    invert,
    permute_patches,
    rotate,
    translate,
    upscale_digits,
)

SMALL = dict(train_size=100, test_size=50, source_size=100)


@pytest.fixture(scope="module")
def bench():
    return merging_benchmark(0, tasks=TARGETS, **SMALL)


def _keys(x):
    """Exact identity of images: MNIST pixels are k/255, so round back to bytes."""
    return {np.round(np.asarray(img) * 255).astype(np.uint8).tobytes() for img in x}


@pytest.fixture(scope="module")
def mnist():
    x, y = load_mnist5k()
    return dict(zip([np.round(i * 255).astype(np.uint8).tobytes() for i in x], y, strict=True))


# ------------------------------------------------------------------ transforms, by hand


def test_rotate_counter_clockwise():
    x = np.array([[[1, 2], [3, 4]]], np.float32)
    np.testing.assert_array_equal(rotate(x, 1)[0], [[2, 4], [1, 3]])
    np.testing.assert_array_equal(rotate(x, 2)[0], [[4, 3], [2, 1]])


def test_invert():
    np.testing.assert_allclose(invert(np.array([[[0.0, 0.25, 1.0]]], np.float32)), [[[1, 0.75, 0]]])


def test_permute_patches_by_hand():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    # Tiles (2x2, row-major): 0 = [[0,1],[4,5]], 1 = [[2,3],[6,7]], 2 = [[8,9],[12,13]], 3 = ...
    out = permute_patches(x, np.array([3, 2, 1, 0]), patch=2)[0]
    np.testing.assert_array_equal(
        out, [[10, 11, 8, 9], [14, 15, 12, 13], [2, 3, 0, 1], [6, 7, 4, 5]]
    )
    with pytest.raises(ValueError, match="do not tile"):
        permute_patches(x, np.arange(3), patch=2)


def test_upscale_digits_by_hand():
    x = np.zeros((1, 8, 8), np.float32)
    x[0, 0, 0], x[0, 7, 1] = 1.0, 0.5
    out = upscale_digits(x)[0]
    assert out.shape == (28, 28)
    np.testing.assert_array_equal(out[2:5, 2:5], np.ones((3, 3)))  # pad 2, then 3x3 blocks
    np.testing.assert_array_equal(out[23:26, 5:8], np.full((3, 3), 0.5))
    assert out.sum() == 9 * 1.5


def test_translate_by_hand():
    x = np.arange(9, dtype=np.float32).reshape(1, 3, 3)
    np.testing.assert_array_equal(
        translate(x, np.array([[1, -1]]))[0], [[0, 0, 0], [1, 2, 0], [4, 5, 0]]
    )
    np.testing.assert_array_equal(translate(x, np.array([[0, 0]])), x)


# ------------------------------------------------------------------ the benchmark


def test_default_tasks_shapes_and_labels():
    b = merging_benchmark(0, **SMALL)
    assert b.names == ("mnist", "rotated", "inverted", "patches", "digits", "parity")
    for t in (b.source, *b.tasks):
        for split in ("train", "val", "test"):
            x, y = t.split(split)
            assert x.dtype == np.float32 and y.dtype == np.int32
            assert x.shape[1:] == (28, 28, 1)
            assert 0.0 <= x.min() and x.max() <= 1.0
            assert set(np.unique(y)) <= set(range(t.num_classes))
    for t in b.tasks:
        assert len(t.y_train) + len(t.y_val) == 100 and len(t.y_test) == 50
        assert len(t.y_val) == 10  # 10 % held out of train
        assert t.num_classes == (2 if t.name == "parity" else 10)


def test_deterministic_and_seeded():
    a = merging_benchmark(3, tasks=("patches", "digits"), **SMALL)
    b = merging_benchmark(3, tasks=("patches", "digits"), **SMALL)
    c = merging_benchmark(4, tasks=("patches", "digits"), **SMALL)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks, strict=True):
        np.testing.assert_array_equal(ta.x_train, tb.x_train)
        np.testing.assert_array_equal(ta.y_test, tb.y_test)
        assert not np.array_equal(ta.x_train, tc.x_train)
    np.testing.assert_array_equal(a.patch_permutation, b.patch_permutation)
    # A task's draw does not depend on which other tasks are built.
    alone = merging_benchmark(3, tasks=("digits",), **SMALL)
    np.testing.assert_array_equal(alone.tasks[0].x_val, a.task("digits").x_val)


def test_splits_disjoint_within_and_across_tasks(bench):
    upright = {t.name: t for t in bench.tasks}
    for t in bench.tasks:
        tr, va, te = _keys(t.x_train), _keys(t.x_val), _keys(t.x_test)
        assert not (tr & va) and not (tr & te) and not (va & te), t.name
    # No target test image is a train/val image of another task (same transform: mnist).
    mnist_train = _keys(upright["mnist"].x_train) | _keys(upright["mnist"].x_val)
    flipped_test = _keys(upright["flipped"].x_test[:, :, ::-1])
    assert not (mnist_train & flipped_test)
    assert len(_keys(bench.source.x_train)) == len(bench.source.y_train)


@pytest.mark.parametrize(
    "name, undo",
    [
        ("mnist", lambda x: x),
        ("rotated", lambda x: rotate(x, -1)),
        ("inverted", lambda x: 1.0 - x),
        ("parity", lambda x: rotate(x, 2)),
        ("flipped", lambda x: x[:, :, ::-1]),
    ],
)
def test_each_transform_is_what_it_says(bench, mnist, name, undo):
    t = bench.task(name)
    originals = undo(t.x_test[..., 0])
    for img, label in zip(originals, t.y_test, strict=True):
        key = np.round(img * 255).astype(np.uint8).tobytes()
        assert key in mnist, f"{name}: an image is not a transformed MNIST image"
        assert label == (mnist[key] % 2 if name == "parity" else mnist[key])


def test_patches_task_uses_the_fixed_permutation(bench, mnist):
    perm = bench.patch_permutation
    assert sorted(perm) == list(range(16)) and np.all(perm != np.arange(16))
    t = bench.task("patches")
    inverse = np.argsort(perm)
    originals = permute_patches(t.x_train[..., 0], inverse)
    keys = [np.round(i * 255).astype(np.uint8).tobytes() for i in originals]
    assert all(k in mnist for k in keys)
    assert [mnist[k] for k in keys] == list(t.y_train)


def test_digits_task_is_upscaled_sklearn_digits(bench):
    xd, yd = load_digits()
    lookup = {np.round(x * 16).astype(np.uint8).tobytes(): y for x, y in zip(xd, yd, strict=True)}
    t = bench.task("digits")
    small = t.x_train[:, 2:26:3, 2:26:3, 0]  # one pixel of each 3x3 block
    np.testing.assert_array_equal(upscale_digits(small), t.x_train[..., 0])
    for img, label in zip(small, t.y_train, strict=True):
        assert lookup[np.round(img * 16).astype(np.uint8).tobytes()] == label


def test_source_is_translated_upright_mnist(bench, mnist):
    # Undo nothing: a translated digit is generally not in MNIST, but its label range and
    # pixel mass are those of MNIST digits; with max_shift=0 the images are MNIST images.
    b0 = merging_benchmark(0, tasks=("mnist",), max_shift=0, **SMALL)
    for img, label in zip(b0.source.x_train[..., 0], b0.source.y_train, strict=True):
        assert mnist[np.round(img * 255).astype(np.uint8).tobytes()] == label
    source = _keys(b0.source.x_train) | _keys(b0.source.x_val) | _keys(b0.source.x_test)
    target = b0.tasks[0]
    assert not source & (_keys(target.x_train) | _keys(target.x_val) | _keys(target.x_test))
    shifted = bench.source.x_train[..., 0]
    moved = sum(np.round(i * 255).astype(np.uint8).tobytes() not in mnist for i in shifted)
    assert moved > len(shifted) // 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks=("mnist", "svhn")), "must be distinct names"),
        (dict(tasks=("mnist", "mnist")), "must be distinct names"),
        (dict(train_size=5), "train_size=5 must be >= 10"),
        (dict(train_size=3500), "exceed the MNIST pools"),
        (dict(tasks=("digits",), train_size=1500, test_size=500), "scikit-learn digits"),
        (dict(max_shift=-1), "max_shift=-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        merging_benchmark(0, **kwargs)


def test_unknown_task_lookup(bench):
    with pytest.raises(KeyError, match="no target task 'svhn'"):
        bench.task("svhn")
