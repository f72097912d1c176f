"""Multi-task benchmarks built from the bundled MNIST-5k: Multi-MNIST and MNIST attributes."""

from __future__ import annotations

import functools

import numpy as np

from cljax.data import _render
from cljax.data._sources import load_mnist5k
from cljax.data._task import Task

__all__ = ["MultiDigitImages", "generate_multi_mnist", "load_mnist_attributes", "load_multi_mnist"]

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
    left, right = _tasks(
        ("left", "right"), (_DIGITS, _DIGITS), canvas[..., None], (labels[a], labels[b]), idx
    )
    return left, right


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
    digit, rotation, parity = _tasks(
        ("digit", "rotation", "parity"),
        (_DIGITS, ("0", "90", "180", "270"), ("even", "odd")),
        np.ascontiguousarray(x, np.float32),
        (labels, rot, (labels % 2).astype(np.int32)),
        idx,
    )
    return digit, rotation, parity


_SPLITS = ("train", "val", "test")
_REAL_PER_CLASS = (350, 50, 100)  # of the 500 MNIST-5k digits of each class
_GLYPH_VARIANTS = (8, 2, 2)  # renderings per (font, digit), by split
_GLYPH_HEIGHTS = (23.0, 25.0, 27.0)


class MultiDigitImages:
    """Multi-MNIST images rendered on access: an array-like ``[N, size, size, 1]`` float32.

    Image ``n`` pastes ``pool[left[n]]`` at ``(shifts[n, 0], shifts[n, 1])`` (top left)
    and ``pool[right[n]]`` at ``(far + shifts[n, 2], far + shifts[n, 3])`` with ``far =
    size - 28 - max_shift`` (bottom right), merged by a pixel-wise maximum. Indexing by
    an int, a slice or an index array renders those images only; ``np.asarray`` renders
    all of them.

    Attributes:
      pool: ``[P, 28, 28]`` float32 digit images of this split (real, then rendered).
      pool_labels: ``[P]`` their digits.
      left, right: ``[N]`` pool indices of each image's two digits.
      shifts: ``[N, 4]`` pixel offsets (left row, left column, right row, right column).
      size: canvas side.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, pool, pool_labels, left, right, shifts, size, max_shift):
        self.pool, self.pool_labels = pool, pool_labels
        self.left, self.right, self.shifts = left, right, shifts
        self.size, self.max_shift = size, max_shift

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.left), self.size, self.size, 1)

    def __len__(self) -> int:
        return len(self.left)

    def _render(self, idx: np.ndarray) -> np.ndarray:
        out = np.zeros((len(idx), self.size, self.size), np.float32)
        far = self.size - 28 - self.max_shift
        for k, n in enumerate(idx):
            r, c, r2, c2 = self.shifts[n]
            out[k, r : r + 28, c : c + 28] = self.pool[self.left[n]]
            region = out[k, far + r2 : far + r2 + 28, far + c2 : far + c2 + 28]
            np.maximum(region, self.pool[self.right[n]], out=region)
        return out[..., None]

    def __getitem__(self, item):
        if isinstance(item, int | np.integer):
            return self._render(np.arange(len(self))[np.asarray([item])])[0]
        if isinstance(item, tuple):
            return self[item[0]][(slice(None), *item[1:])]
        return self._render(np.arange(len(self))[item].reshape(-1))

    def __array__(self, dtype=None, copy=None):
        x = self._render(np.arange(len(self)))
        return x if dtype is None else x.astype(dtype)


@functools.lru_cache(maxsize=4)
def _pools(seed: int) -> tuple[tuple[np.ndarray, np.ndarray, int], ...]:
    """Per split: ``(images, labels, n_real)``, real MNIST-5k digits then rendered glyphs.

    The real digits are split by class (350 / 50 / 100 of each class's 500), so no test
    image holds a digit seen in training; each (held-out font, digit) pair is rendered
    12 times (random size, tilt and offset), 8 renderings for training, 2 for validation
    and 2 for test.
    """
    images, labels = load_mnist5k()
    rng = np.random.default_rng([seed, 7])
    real = [[], [], []]
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(labels == d))
        bounds = np.cumsum((0,) + _REAL_PER_CLASS)
        for s in range(3):
            real[s].append(idx[bounds[s] : bounds[s + 1]])
    glyphs = [([], []) for _ in range(3)]
    for font in _render.HELDOUT_FONTS:
        for d in range(10):
            split = np.repeat(np.arange(3), _GLYPH_VARIANTS)
            for s in split:
                m = _render.glyph_mask(
                    str(d),
                    font,
                    size=28,
                    height=_GLYPH_HEIGHTS[rng.integers(len(_GLYPH_HEIGHTS))],
                    centre=tuple(14.0 + rng.uniform(-1.0, 1.0, 2)),
                    angle=float(rng.uniform(-12.0, 12.0)),
                )
                glyphs[s][0].append(m.astype(np.float32))
                glyphs[s][1].append(d)
    out = []
    for s in range(3):
        r = np.sort(np.concatenate(real[s]))
        x = np.concatenate([images[r], np.stack(glyphs[s][0])]).astype(np.float32)
        y = np.concatenate([labels[r], np.asarray(glyphs[s][1])]).astype(np.int32)
        x.setflags(write=False)
        y.setflags(write=False)
        out.append((x, y, len(r)))
    return tuple(out)


def generate_multi_mnist(
    num_train: int = 60000,
    num_val: int = 5000,
    num_test: int = 10000,
    *,
    glyph_fraction: float = 0.5,
    size: int = 36,
    max_shift: int = 2,
    seed: int = 0,
) -> tuple[Task, Task]:
    """Multi-MNIST as the papers build it, at their size, rendered on the fly.

    Each image puts one digit shifted up-left and one shifted down-right on a
    ``size``×``size`` canvas: the left digit's 28×28 box at offsets ``(dy, dx)`` and the
    right one's at ``size - 28 - max_shift + (dy', dx')``, each offset uniform in ``[0,
    max_shift]``, merged by a pixel-wise maximum. Task ``"left"`` labels the up-left
    digit, ``"right"`` the down-right one.

    The layout is the papers': Sener & Koltun's Multi-MNIST pastes the left digit at
    ``(0, 0)`` and the right one at ``(6, 6)`` of a 36×36 canvas, 6 pixels apart along
    each axis. With the defaults (36×36, ``max_shift=2``; each digit 2 to 4 pixels from
    the canvas centre) the right box starts 4 to 8 pixels below and right of the left
    one, 6 on average: the paper's layout is the middle of the distribution, as much
    of each digit is hidden as in the paper on average, and the closer pairs hide more.
    A larger ``max_shift`` lets the boxes come closer (at 4, from 0 to 8 pixels apart,
    4 on average, and some images put the two digits on top of each other, where even
    a reader cannot tell which is which).

    Each digit is a real MNIST digit (the bundled MNIST-5k) or, with probability
    ``glyph_fraction``, a digit rendered in one of the held-out fonts (none is drawn by
    the procedural pretraining corpus). The splits use disjoint digits: 350 / 50 / 100
    real digits of each class, and separate renderings of the glyphs, so a test image
    never repeats a training digit.

    Images are rendered when indexed (an image costs microseconds; ``[N, 36, 36, 1]``
    float32 at 60k would hold 311 MB): the tasks' ``x`` arrays are
    :class:`MultiDigitImages`. Image ``n`` of a split depends only on ``(seed, split,
    n)``'s draws, made once at construction.

    Args:
      num_train: training images (the papers: 60,000).
      num_val: validation images.
      num_test: test images (the papers: 10,000).
      glyph_fraction: probability that a digit is a rendered glyph, in ``[0, 1]``.
      size: canvas side, ``>= 28 + max_shift``.
      max_shift: largest shift of each digit towards the other, in pixels, ``>= 0``.
      seed: seed of the digit split, the renderings and every draw.

    Returns:
      ``(left, right)``: two :class:`~cljax.data.Task` objects sharing their images.

    Raises:
      ValueError: on a negative count, ``glyph_fraction`` outside ``[0, 1]``, a negative
        shift or a canvas too small for it.

    Example::

      >>> left, right = generate_multi_mnist(20000, 1000, 2000, seed=0)
      >>> left.batch_at(0, 128)["x"].shape  # (128, 36, 36, 1)

    References:
      Sabour et al., "Dynamic Routing Between Capsules", NeurIPS 2017. Sener & Koltun,
      "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
    """
    counts = (num_train, num_val, num_test)
    if min(counts) < 1:
        raise ValueError(
            f"generate_multi_mnist: {num_train=}, {num_val=}, {num_test=} must be >= 1"
        )
    if not 0.0 <= glyph_fraction <= 1.0:
        raise ValueError(f"generate_multi_mnist: {glyph_fraction=} must be in [0, 1]")
    check_layout("generate_multi_mnist", size, max_shift)
    pools = _pools(seed)
    xs, ys = [], []
    for s, n in enumerate(counts):
        pool, pool_y, n_real = pools[s]
        rng = np.random.default_rng([seed, s])
        pick = []
        for _ in range(2):
            glyph = rng.random(n) < glyph_fraction
            real_i = rng.integers(0, n_real, n)
            glyph_i = n_real + rng.integers(0, len(pool_y) - n_real, n)
            pick.append(np.where(glyph, glyph_i, real_i))
        shifts = rng.integers(0, max_shift + 1, (n, 4))
        xs.append(MultiDigitImages(pool, pool_y, pick[0], pick[1], shifts, size, max_shift))
        ys.append((pool_y[pick[0]], pool_y[pick[1]]))
    return left_right_tasks(_DIGITS, xs, ys)


def check_layout(fn: str, size: int, max_shift: int) -> None:
    """Multi-MNIST's layout: shifts ``>= 0`` and a canvas that holds a shifted 28×28 object."""
    if max_shift < 0:
        raise ValueError(f"{fn}: {max_shift=} must be >= 0")
    if size < 28 + max_shift:
        raise ValueError(f"{fn}: {size=} must be >= 28 + {max_shift=}")


def split_tasks(names, classes, xs, ys) -> tuple[Task, ...]:
    """One task per name over shared images: ``xs`` per split, ``ys`` per split one label
    array per task, ``classes`` one class-name tuple per task."""
    return tuple(
        Task(name, cls, xs[0], ys[0][k], xs[1], ys[1][k], xs[2], ys[2][k])
        for k, (name, cls) in enumerate(zip(names, classes, strict=True))
    )


def left_right_tasks(classes, xs, ys) -> tuple[Task, Task]:
    """The ``(left, right)`` tasks of per-split images ``xs`` and label pairs ``ys``."""
    left, right = split_tasks(("left", "right"), (classes, classes), xs, ys)
    return left, right
