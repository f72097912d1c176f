import numpy as np
import pytest

from cljax.data import (
    MultiDigitImages,
    generate_multi_mnist,
    load_mnist5k,
    load_mnist_attributes,
    load_multi_mnist,
)


def test_multi_mnist_overlays_two_real_digits():
    left, right = load_multi_mnist(200, seed=3)
    assert left.x_train.shape == (140, 36, 36, 1) and left.x_test.shape == (40, 36, 36, 1)
    assert left.x_train is right.x_train  # one shared copy of the images
    assert left.x_train.dtype == np.float32 and 0 <= left.x_train.min() and left.x_train.max() <= 1
    assert not np.array_equal(left.y_train, right.y_train)
    # Rebuild one image from the two source digits: the left digit lies at the top left.
    images, labels = load_mnist5k()
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5000, 200)
    b = rng.integers(0, 5000, 200)
    shifts = rng.integers(0, 5, (200, 4))
    x = np.zeros((36, 36), np.float32)
    x[shifts[0, 0] : shifts[0, 0] + 28, shifts[0, 1] : shifts[0, 1] + 28] = images[a[0]]
    r, c = 8 - shifts[0, 2], 8 - shifts[0, 3]
    x[r : r + 28, c : c + 28] = np.maximum(x[r : r + 28, c : c + 28], images[b[0]])
    all_x = np.concatenate([left.x_train, left.x_val, left.x_test])[..., 0]
    all_left = np.concatenate([left.y_train, left.y_val, left.y_test])
    hit = [i for i in range(200) if np.array_equal(all_x[i], x)]
    assert hit and all_left[hit[0]] == labels[a[0]]


def test_multi_mnist_deterministic_and_validated():
    a, _ = load_multi_mnist(50, seed=1)
    b, _ = load_multi_mnist(50, seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    with pytest.raises(ValueError, match="size=20 must be >= 28"):
        load_multi_mnist(50, size=20)


def test_mnist_attributes():
    digit, rotation, parity = load_mnist_attributes(seed=0)
    assert digit.x_train.shape == (3500, 28, 28, 1)
    np.testing.assert_array_equal(parity.y_train, digit.y_train % 2)
    assert set(np.unique(rotation.y_train)) == {0, 1, 2, 3}
    assert rotation.num_classes == 4 and parity.num_classes == 2


def test_generated_multi_mnist_shapes_and_indexing():
    left, right = generate_multi_mnist(200, 50, 60, seed=1)
    assert left.x_train is right.x_train and isinstance(left.x_train, MultiDigitImages)
    assert left.x_train.shape == (200, 36, 36, 1) and len(left.x_val) == 50
    assert left.x_test.shape == (60, 36, 36, 1) and left.num_classes == 10
    full = np.asarray(left.x_test)
    assert full.shape == (60, 36, 36, 1) and full.dtype == np.float32
    assert 0 <= full.min() and full.max() <= 1 and full.max() > 0.9
    np.testing.assert_array_equal(left.x_test[7], full[7])
    np.testing.assert_array_equal(left.x_test[3:9], full[3:9])
    np.testing.assert_array_equal(left.x_test[np.array([5, 1, 5])], full[[5, 1, 5]])
    b = left.batch_at(2, 32, seed=4)
    assert b["x"].shape == (32, 36, 36, 1) and b["y"].shape == (32,)


def test_generated_multi_mnist_is_deterministic():
    a, ar = generate_multi_mnist(100, 20, 30, seed=2)
    b, br = generate_multi_mnist(100, 20, 30, seed=2)
    c, _ = generate_multi_mnist(100, 20, 30, seed=3)
    np.testing.assert_array_equal(np.asarray(a.x_train), np.asarray(b.x_train))
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_array_equal(ar.y_train, br.y_train)
    assert not np.array_equal(np.asarray(a.x_train), np.asarray(c.x_train))
    # a split's draws do not depend on the other splits' sizes
    d, _ = generate_multi_mnist(100, 20, 31, seed=2)
    np.testing.assert_array_equal(np.asarray(d.x_train), np.asarray(a.x_train))


def test_generated_multi_mnist_labels_and_layout():
    """The left label is the digit pasted top-left; a slow loop rebuilds every image."""
    left, right = generate_multi_mnist(300, 20, 20, glyph_fraction=0.5, seed=0)
    x = left.x_train
    imgs = np.asarray(x)[..., 0]
    for n in range(300):
        r, c, r2, c2 = (int(v) for v in x.shifts[n])
        assert 0 <= min(r, c, r2, c2) and max(r, c, r2, c2) <= 2  # default max_shift=2
        canvas = np.zeros((36, 36), np.float32)
        for i in range(28):
            for j in range(28):
                canvas[r + i, c + j] = x.pool[x.left[n]][i, j]
        for i in range(28):
            for j in range(28):
                y0, x0 = 6 + r2 + i, 6 + c2 + j  # 36 - 28 - max_shift
                canvas[y0, x0] = max(canvas[y0, x0], x.pool[x.right[n]][i, j])
        np.testing.assert_array_equal(imgs[n], canvas)
        assert left.y_train[n] == x.pool_labels[x.left[n]]
        assert right.y_train[n] == x.pool_labels[x.right[n]]
    # with no shift, the top rows hold the left digit alone
    left0, _ = generate_multi_mnist(50, 5, 5, max_shift=0, seed=0)
    x0 = left0.x_train
    np.testing.assert_array_equal(np.asarray(x0)[:, :8, :28, 0], x0.pool[x0.left][:, :8])
    # the real digits of the pool carry their MNIST labels; both kinds of digits are used
    images, labels = load_mnist5k()
    n_real = int(np.sum([np.any(np.all(images == p, axis=(1, 2))) for p in x.pool[:50]]))
    assert n_real == 50
    for p, lab in zip(x.pool[:50], x.pool_labels[:50], strict=True):
        assert lab == labels[np.flatnonzero(np.all(images == p, axis=(1, 2)))[0]]
    assert np.any(x.left >= 3500) and np.any(x.left < 3500)


def test_generated_multi_mnist_layout_centres_on_the_papers_offset():
    """By default the right box starts 4 to 8 px below and right of the left one, 6 on
    average (the paper's fixed layout: (0, 0) and (6, 6)); ``max_shift=4`` lets them meet."""
    for max_shift, lo, hi in ((2, 4, 8), (4, 0, 8)):
        left, _ = generate_multi_mnist(2000, 5, 5, max_shift=max_shift, seed=0)
        x = left.x_train
        sh = x.shifts
        rel = 36 - 28 - max_shift + sh[:, 2:] - sh[:, :2]  # right box minus left box
        assert rel.min() == lo and rel.max() == hi
        assert abs(rel.mean() - (lo + hi) / 2) < 0.1
        # the offsets are those of the pixels: the right digit's ink sits at its box
        n = int(np.argmax(rel.sum(1)))
        right_only = np.zeros((36, 36), np.float32)
        r, c = 36 - 28 - max_shift + sh[n, 2:]
        right_only[r : r + 28, c : c + 28] = x.pool[x.right[n]]
        assert np.all(np.asarray(x[n])[..., 0] >= right_only)


def test_generated_multi_mnist_splits_use_disjoint_digits():
    left, _ = generate_multi_mnist(50, 50, 50, seed=0)
    key = lambda p: p.tobytes()
    train = {key(p) for p in left.x_train.pool}
    assert not any(key(p) in train for p in left.x_test.pool)
    assert not any(key(p) in train for p in left.x_val.pool)


def test_generated_multi_mnist_validates():
    with pytest.raises(ValueError, match="glyph_fraction=1.5"):
        generate_multi_mnist(10, 10, 10, glyph_fraction=1.5)
    with pytest.raises(ValueError, match="size=29"):  # 28 + max_shift=2 does not fit
        generate_multi_mnist(10, 10, 10, size=29)
    with pytest.raises(ValueError, match="size=30"):
        generate_multi_mnist(10, 10, 10, size=30, max_shift=4)
