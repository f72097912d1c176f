"""Multi-task benchmarks built from the bundled MNIST-5k: Multi-MNIST and MNIST attributes."""

from __future__ import annotations

import numpy as np

from cljax.data._sources import load_mnist5k
from cljax.data._task import Task

__all__ = ["load_mnist_attributes", "load_multi_mnist"]

_DIGITS = tuple(str(i) for i in range(10))


def _splits(n: int, val_fraction: float, test_fraction: float, rng: np.random.Generator):
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"{val_fraction=} and {test_fraction=} must be in (0, 1) with sum < 1")
    perm = rng.permutation(n)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def _tasks(names, classes, x, ys, idx) -> tuple[Task, ...]:
    tr, va, te = idx
    xs = (x[tr], x[va], x[te])  # shared by all tasks: one copy of the images
    return tuple(
        Task(name, cls, xs[0], y[tr], xs[1], y[va], xs[2], y[te])
        for name, cls, y in zip(names, classes, ys, strict=True)
    )


def load_multi_mnist(
    num_samples: int = 10000,
    *,
    size: int = 36,
    max_shift: int = 4,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> tuple[Task, Task]:
    """Multi-MNIST: two MNIST digits overlaid, one at the top left, one at the bottom right.

    Following Sabour et al. (2017) and Sener & Koltun (2018): each image places a digit at
    the top-left corner of a ``size``×``size`` canvas and another at the bottom-right
    corner, each shifted by up to ``max_shift`` pixels inwards, and merges them with a
    pixel-wise maximum, so the two overlap. Digits come from the bundled MNIST-5k (real
    MNIST, 500 per class; pairs are drawn with replacement, so ``num_samples`` may exceed
    5,000). Task ``"left"`` is the top-left digit, task ``"right"`` the bottom-right one.

    Args:
      num_samples: images in total (split into train / val / test).
      size: canvas side, ``>= 28``.
      max_shift: largest inward shift of each digit, in pixels.
      seed: seed of the pairing, shifts and split.
      val_fraction: fraction held out for validation.
      test_fraction: fraction held out for test.

    Returns:
      ``(left, right)``: two :class:`~cljax.data.Task` objects sharing their images
      (float32 ``[N, size, size, 1]`` in [0, 1]).

    Raises:
      ValueError: on a canvas smaller than 28, a negative shift that does not fit, or bad
        fractions.

    Example::

      >>> left, right = load_multi_mnist(2000, seed=0)
      >>> left.x_train.shape  # (1400, 36, 36, 1)

    References:
      Sabour et al., "Dynamic Routing Between Capsules", NeurIPS 2017. Sener & Koltun,
      "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
    """
    if size < 28:
        raise ValueError(f"load_multi_mnist: {size=} must be >= 28")
    if max_shift < 0:
        raise ValueError(f"load_multi_mnist: {max_shift=} must be >= 0")
    if num_samples < 10:
        raise ValueError(f"load_multi_mnist: {num_samples=} must be >= 10")
    images, labels = load_mnist5k()
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(labels), num_samples)
    b = rng.integers(0, len(labels), num_samples)
    shifts = rng.integers(0, max_shift + 1, (num_samples, 4))
    canvas = np.zeros((num_samples, size, size), np.float32)
    far = size - 28
    for n in range(num_samples):
        r, c = shifts[n, 0], shifts[n, 1]
        canvas[n, r : r + 28, c : c + 28] = images[a[n]]
        r, c = max(far - shifts[n, 2], 0), max(far - shifts[n, 3], 0)
        region = canvas[n, r : r + 28, c : c + 28]
        np.maximum(region, images[b[n]], out=region)
    idx = _splits(num_samples, val_fraction, test_fraction, rng)
    return _tasks(
        ("left", "right"), (_DIGITS, _DIGITS), canvas[..., None], (labels[a], labels[b]), idx
    )


def load_mnist_attributes(
    *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> tuple[Task, Task, Task]:
    """MNIST-5k with three tasks per image: the digit, its rotation, and its parity.

    Each of the 5,000 real MNIST digits is rotated by a random multiple of 90°. Task
    ``"digit"`` (10 classes) asks for the digit, ``"rotation"`` (4 classes: 0, 90, 180,
    270°) for the rotation and ``"parity"`` (2 classes) for the digit's parity: the first
    and third want rotation-invariant features, the second rotation-sensitive ones.

    Args:
      seed: seed of the rotations and the split.
      val_fraction: fraction held out for validation.
      test_fraction: fraction held out for test.

    Returns:
      ``(digit, rotation, parity)`` :class:`~cljax.data.Task` objects sharing their images
      (float32 ``[5000, 28, 28, 1]``).

    Raises:
      ValueError: on bad fractions.

    Example::

      >>> digit, rotation, parity = load_mnist_attributes(seed=0)

    References:
      Gidaris et al., "Unsupervised Representation Learning by Predicting Image
      Rotations", ICLR 2018 (rotation prediction as a task).
    """
    images, labels = load_mnist5k()
    rng = np.random.default_rng(seed)
    rot = rng.integers(0, 4, len(labels)).astype(np.int32)
    x = np.stack([np.rot90(im, k) for im, k in zip(images, rot, strict=True)])[..., None]
    idx = _splits(len(labels), val_fraction, test_fraction, rng)
    return _tasks(
        ("digit", "rotation", "parity"),
        (_DIGITS, ("0", "90", "180", "270"), ("even", "odd")),
        np.ascontiguousarray(x, np.float32),
        (labels, rot, (labels % 2).astype(np.int32)),
        idx,
    )
