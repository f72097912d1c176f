"""Embedded continual benchmarks: shapes, label spaces, the per-task transforms."""

import numpy as np
import pytest

from cljax import data


@pytest.fixture(scope="module")
def pmnist():
    return data.permuted_mnist(3, seed=0)


def test_permuted_mnist(pmnist):
    assert [t.name for t in pmnist] == ["pmnist-0", "pmnist-1", "pmnist-2"]
    t0, t1 = pmnist[0], pmnist[1]
    assert t0.x_train.shape == (3600, 28, 28, 1) and t0.x_test.shape == (1000, 28, 28, 1)
    assert t0.num_classes == 10 and set(np.unique(t0.y_train)) == set(range(10))
    np.testing.assert_array_equal(t0.y_train, t1.y_train)  # same images, other permutation
    a, b = t0.x_train.reshape(-1, 784), t1.x_train.reshape(-1, 784)
    # a fixed permutation maps one onto the other: per-pixel sums are a permutation
    np.testing.assert_allclose(np.sort(a.sum(0)), np.sort(b.sum(0)), rtol=1e-5)
    assert not np.allclose(a, b)
    again = data.permuted_mnist(2, seed=0)
    np.testing.assert_array_equal(again[1].x_test, t1.x_test)
    ident = data.permuted_mnist(1, identity_first=True)[0]
    x, y = data.load_mnist5k()
    assert ident.x_test.reshape(-1, 784)[0].tolist() in x.reshape(-1, 784).tolist()


def test_split_mnist():
    tasks = data.split_mnist(5)
    assert [t.classes for t in tasks] == [
        ("0", "1"),
        ("2", "3"),
        ("4", "5"),
        ("6", "7"),
        ("8", "9"),
    ]
    total = sum(len(t.y_train) + len(t.y_val) + len(t.y_test) for t in tasks)
    assert total == 5000
    for t in tasks:
        assert set(np.unique(t.y_test)) == {0, 1}
    custom = data.split_mnist(2, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert custom[0].classes == ("9", "8", "7", "6", "5")


def test_rotated_mnist():
    tasks = data.rotated_mnist(angles=[0.0, 90.0])
    a, b = tasks[0].x_test[..., 0], tasks[1].x_test[..., 0]
    # a 90 degree rotation is exact on the pixel grid
    np.testing.assert_allclose(np.rot90(a, k=1, axes=(1, 2)), b, atol=1e-5)
    assert [t.name for t in data.rotated_mnist(3)] == ["rotated-0", "rotated-60", "rotated-120"]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"num_tasks=0 must be >= 1"):
        data.permuted_mnist(0)
    with pytest.raises(ValueError, match=r"num_tasks=3 must divide the 10 digits"):
        data.split_mnist(3)
    with pytest.raises(ValueError, match=r"must be a permutation"):
        data.split_mnist(5, order=[0] * 10)
    with pytest.raises(ValueError, match=r"angles is empty"):
        data.rotated_mnist(angles=[])
