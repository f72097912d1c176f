import numpy as np
import pytest

from cljax.data import load_mnist5k, load_mnist_attributes, load_multi_mnist


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
