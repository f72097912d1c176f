"""Embedded continual-learning benchmarks from the bundled MNIST-5k: Permuted, Split, Rotated.

All three share one shuffled train/val/test split of the 5,000 real MNIST digits, so task
``i`` of every benchmark sees the same underlying images (only the transform differs), and
nothing is downloaded. Images are ``[N, 28, 28, 1]`` float32 in [0, 1]
(``permuted_mnist(normalize=True)``: standardised as GPM's loader).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cljax.data._sources import load_mnist5k
from cljax.data._task import Task, split_train_val

__all__ = ["permuted_mnist", "rotated_mnist", "split_mnist"]

_DIGITS = tuple(str(i) for i in range(10))
# MNIST's pixel mean and standard deviation (over the 60k training images), the constants of
# torchvision's usual MNIST transform and of GPM's loader.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _base_split(seed: int, test_fraction: float, val_fraction: float):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{test_fraction=} must be in (0, 1)")
    x, y = load_mnist5k()
    perm = np.random.default_rng([seed, 5000]).permutation(len(y))
    x, y = x[perm][..., None], y[perm]
    n_test = int(round(len(y) * test_fraction))
    (xtr, ytr), (xva, yva) = split_train_val(
        x[n_test:], y[n_test:], fraction=val_fraction, seed=seed
    )
    return (xtr, ytr), (xva, yva), (x[:n_test], y[:n_test])


def _check_tasks(num_tasks: int, most: int | None = None) -> None:
    if num_tasks < 1 or (most is not None and num_tasks > most):
        bound = f"in [1, {most}]" if most else ">= 1"
        raise ValueError(f"{num_tasks=} must be {bound}")


def permuted_mnist(
    num_tasks: int = 10,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    identity_first: bool = False,
    normalize: bool = False,
) -> list[Task]:
    """Permuted MNIST: each task applies its own fixed pixel permutation (domain-incremental).

    The GPM paper's benchmark (10 tasks, 10 classes each, one shared head) with the 5,000
    bundled digits instead of the full 70,000.

    Args:
      num_tasks: number of tasks.
      seed: seed of the split and of the permutations.
      test_fraction: fraction of the 5,000 images held out as test.
      val_fraction: fraction of the rest held out as validation.
      identity_first: leave task 0 unpermuted (some codebases do; GPM permutes all).
      normalize: standardise the pixels, ``(x - 0.1307) / 0.3081``, as GPM's loader
        (``dataloader/pmnist.py``: ``transforms.Normalize`` before the permutation). The
        background is then -0.42 instead of 0, so a permuted zero pixel is not a missing
        input to the first layer. Off by default: images stay in [0, 1] as the other
        benchmarks.

    Returns:
      ``num_tasks`` :class:`Task` objects named ``pmnist-<i>``.

    Raises:
      ValueError: on ``num_tasks < 1`` or bad fractions.

    References:
      Goodfellow et al., "An Empirical Investigation of Catastrophic Forgetting", 2013;
      Saha et al., GPM, ICLR 2021.
    """
    _check_tasks(num_tasks)
    if not isinstance(normalize, bool | np.bool_):
        raise ValueError(f"permuted_mnist: {normalize=} must be a bool")
    tr, va, te = _base_split(seed, test_fraction, val_fraction)
    rng = np.random.default_rng([seed, 1])
    tasks = []
    for t in range(num_tasks):
        perm = np.arange(784) if (identity_first and t == 0) else rng.permutation(784)

        def f(x, perm=perm):
            if normalize:
                x = ((x - MNIST_MEAN) / MNIST_STD).astype(np.float32)
            return x.reshape(len(x), 784)[:, perm].reshape(x.shape)

        tasks.append(
            Task(f"pmnist-{t}", _DIGITS, f(tr[0]), tr[1], f(va[0]), va[1], f(te[0]), te[1])
        )
    return tasks


def split_mnist(
    num_tasks: int = 5,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    order: Sequence[int] | None = None,
) -> list[Task]:
    """Split MNIST: the ten digits split into ``num_tasks`` disjoint groups of classes.

    Labels are local to each task (``0..k-1``); ``Task.classes`` holds the digit names.
    The runner maps them to one head per task (task-incremental) or to a single head over
    all classes (class-incremental).

    Args:
      num_tasks: number of tasks; must divide 10 (5 gives the pairs 0/1, 2/3, ...).
      seed: seed of the split.
      test_fraction, val_fraction: as :func:`permuted_mnist`.
      order: optional permutation of the ten digits before splitting.

    Returns:
      ``num_tasks`` :class:`Task` objects named ``split-<digits>``.

    Raises:
      ValueError: if ``num_tasks`` does not divide 10 or ``order`` is not a permutation.

    References:
      Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017.
    """
    _check_tasks(num_tasks, 10)
    if 10 % num_tasks:
        raise ValueError(f"{num_tasks=} must divide the 10 digits")
    order = list(range(10)) if order is None else [int(o) for o in order]
    if sorted(order) != list(range(10)):
        raise ValueError(f"{order=} must be a permutation of 0..9")
    tr, va, te = _base_split(seed, test_fraction, val_fraction)
    k = 10 // num_tasks
    tasks = []
    for t in range(num_tasks):
        digits = order[t * k : (t + 1) * k]
        lut = np.full(10, -1, np.int32)
        lut[digits] = np.arange(k)

        def pick(x, y, digits=digits, lut=lut):
            keep = np.isin(y, digits)
            return x[keep], lut[y[keep]]

        name = "split-" + "".join(map(str, digits))
        classes = tuple(str(d) for d in digits)
        tasks.append(Task(name, classes, *pick(*tr), *pick(*va), *pick(*te)))
    return tasks


def _rotate(x: np.ndarray, angle: float) -> np.ndarray:
    from scipy.ndimage import rotate

    if angle % 360 == 0:
        return x.copy()
    out = rotate(x[..., 0], angle, axes=(2, 1), reshape=False, order=1, mode="constant")
    return np.clip(out, 0.0, 1.0).astype(np.float32)[..., None]


def rotated_mnist(
    num_tasks: int = 5,
    *,
    angles: Sequence[float] | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> list[Task]:
    """Rotated MNIST: each task rotates every digit by its own angle (domain-incremental).

    Args:
      num_tasks: number of tasks (ignored when ``angles`` is given).
      angles: rotation per task in degrees; default ``i * 180 / num_tasks``.
      seed: seed of the split.
      test_fraction, val_fraction: as :func:`permuted_mnist`.

    Returns:
      One :class:`Task` per angle, named ``rotated-<angle>``.

    Raises:
      ValueError: on ``num_tasks < 1`` or an empty ``angles``.

    References:
      Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    """
    if angles is None:
        _check_tasks(num_tasks)
        angles = [i * 180.0 / num_tasks for i in range(num_tasks)]
    angles = [float(a) for a in angles]
    if not angles:
        raise ValueError("rotated_mnist: angles is empty")
    tr, va, te = _base_split(seed, test_fraction, val_fraction)
    tasks = []
    for a in angles:
        tasks.append(
            Task(
                f"rotated-{a:g}",
                _DIGITS,
                _rotate(tr[0], a),
                tr[1],
                _rotate(va[0], a),
                va[1],
                _rotate(te[0], a),
                te[1],
            )
        )
    return tasks
