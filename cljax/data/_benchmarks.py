"""An embedded model-merging benchmark: domain-shifted digit tasks built from bundled real data.

The field's merging benchmark fine-tunes one pretrained encoder (CLIP) on 8 image datasets
and merges the fine-tuned encoders (Ilharco et al., "Editing Models with Task Arithmetic",
ICLR 2023; github.com/mlfoundations/task_vectors). This module builds a small analogue
that runs on a laptop CPU and needs no download: a *source* task to pretrain an encoder on,
and several *target* tasks that each shift the input domain or the labelling.

Target tasks (each 28x28x1, float32 in [0, 1]):

==========  ======================================================================  =======
name        input                                                                   classes
==========  ======================================================================  =======
mnist       upright MNIST digits                                                    10
rotated     MNIST rotated by 90° counter-clockwise                                  10
inverted    MNIST with inverted intensities, ``1 - x``                              10
patches     MNIST with its 16 7x7 patches shuffled by one fixed permutation         10
digits      scikit-learn's 8x8 digits, each pixel repeated 3x3, padded to 28x28     10
parity      MNIST rotated by 180°, labelled even (0) / odd (1)                      2
flipped     MNIST mirrored left-right (not in the default six)                      10
==========  ======================================================================  =======

The source task is upright MNIST on images no target task uses, fewer of them, with small
random translations (up to ``max_shift`` pixels): the pretrained encoder knows digit shapes,
which helps every target, but has never seen a rotated, inverted, shuffled or upscaled one.

Images: MNIST-5k (500 images a class) is shuffled with ``seed``; the first
``source_size`` images belong to the source, the rest is split into a target train pool and
a target test pool, so no target test image is the train image of any target task. Each
target task draws its own train and test images from the pools (independent draws per task),
then holds out a validation part of its train images with :func:`split_train_val` (as
task_vectors' ``split_train_into_train_val``). scikit-learn's digits get their own train/test split.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from cljax.data._sources import load_digits, load_mnist5k
from cljax.data._task import Task, split_train_val

__all__ = ["TARGETS", "MergingBenchmark", "merging_benchmark"]

#: Every target task :func:`merging_benchmark` can build, default six first.
TARGETS: tuple[str, ...] = (
    "mnist",
    "rotated",
    "inverted",
    "patches",
    "digits",
    "parity",
    "flipped",
)
_DEFAULT_TARGETS = TARGETS[:6]
_DIGITS = tuple(str(i) for i in range(10))


@dataclasses.dataclass(frozen=True, eq=False)
class MergingBenchmark:
    """A source task to pretrain on and target tasks to fine-tune on and merge.

    Attributes:
      source: the pretraining task (upright, translated MNIST on images of its own).
      tasks: the target tasks, in order.
      seed: the seed the benchmark was built from.
      patch_permutation: the permutation of the 16 7x7 patches used by ``patches``
        (``out[j] = in[perm[j]]`` in row-major patch order).
    """

    source: Task
    tasks: tuple[Task, ...]
    seed: int
    patch_permutation: np.ndarray

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the target tasks."""
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> Task:
        """The target task called ``name``.

        Raises:
          KeyError: if there is none.
        """
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no target task {name!r}; the benchmark has {self.names}")


# ---------------------------------------------------------------------------------------------
# Transforms of [N, 28, 28] image stacks.


def rotate(x: np.ndarray, quarter_turns: int) -> np.ndarray:
    """Rotates ``[N, H, W]`` images counter-clockwise by ``90° * quarter_turns``."""
    return np.ascontiguousarray(np.rot90(x, k=quarter_turns, axes=(1, 2)))


def invert(x: np.ndarray) -> np.ndarray:
    """``1 - x``: white digits on black become black digits on white."""
    return (1.0 - x).astype(x.dtype)


def permute_patches(x: np.ndarray, perm: np.ndarray, patch: int = 7) -> np.ndarray:
    """Shuffles the ``patch x patch`` tiles of ``[N, H, W]`` images.

    Tiles are numbered row-major; tile ``j`` of the output is tile ``perm[j]`` of the input.
    """
    n, h, w = x.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w or len(perm) != gh * gw:
        raise ValueError(f"permute_patches: {patch=} and {len(perm)=} do not tile {(h, w)}")
    tiles = x.reshape(n, gh, patch, gw, patch).transpose(0, 1, 3, 2, 4).reshape(n, gh * gw, -1)
    tiles = tiles[:, perm].reshape(n, gh, gw, patch, patch)
    return np.ascontiguousarray(tiles.transpose(0, 1, 3, 2, 4).reshape(n, h, w))


def upscale_digits(x: np.ndarray, size: int = 28, factor: int = 3) -> np.ndarray:
    """Repeats each pixel of ``[N, 8, 8]`` images ``factor x factor`` times and zero-pads to ``size``."""
    big = np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)
    pad = size - big.shape[1]
    if pad < 0:
        raise ValueError(f"upscale_digits: {factor=} makes {big.shape[1:]} images > {size=}")
    lo = pad // 2
    return np.pad(big, ((0, 0), (lo, pad - lo), (lo, pad - lo)))


def translate(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shifts each image of ``[N, H, W]`` by ``shifts[i] = (dy, dx)`` pixels, filling with 0."""
    out = np.zeros_like(x)
    h, w = x.shape[1:]
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, yd, xd] = x[i, ys, xs]
    return out


# ---------------------------------------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator that depends on the benchmark seed and a name, not on the build order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _make_task(
    name: str,
    classes: tuple[str, ...],
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    val_fraction: float,
    seed: int,
) -> Task:
    (xt, yt), (xv, yv) = split_train_val(x_train, y_train, fraction=val_fraction, seed=seed)
    img = lambda a: np.ascontiguousarray(a[..., None], dtype=np.float32)
    lab = lambda a: np.asarray(a, np.int32)
    return Task(name, classes, img(xt), lab(yt), img(xv), lab(yv), img(x_test), lab(y_test))


def merging_benchmark(
    seed: int = 0,
    *,
    tasks: tuple[str, ...] = _DEFAULT_TARGETS,
    train_size: int = 1000,
    test_size: int = 500,
    source_size: int = 1000,
    max_shift: int = 2,
    val_fraction: float = 0.1,
) -> MergingBenchmark:
    """Builds the embedded merging benchmark (see the module docstring for the tasks).

    Args:
      seed: fixes the image assignment, every draw, the patch permutation and the
        validation splits.
      tasks: names of the target tasks, a subset of :data:`TARGETS`, in the order wanted.
      train_size: images per target task before the validation part is held out.
      test_size: test images per target task.
      source_size: MNIST images reserved for the source task (its train + val + test).
      max_shift: largest random translation (pixels) of the source images.
      val_fraction: fraction of each train split held out for validation.

    Returns:
      A :class:`MergingBenchmark`.

    Raises:
      ValueError: for an unknown or repeated task name, or sizes the bundled data cannot
        supply (MNIST-5k has 5,000 images, scikit-learn's digits 1,797).

    Example:
      >>> bench = merging_benchmark(seed=0)
      >>> bench.names
      ('mnist', 'rotated', 'inverted', 'patches', 'digits', 'parity')
      >>> bench.task("rotated").x_train.shape
      (900, 28, 28, 1)

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (the 8-task protocol
      this benchmark imitates).
    """
    unknown = [t for t in tasks if t not in TARGETS]
    if unknown or len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"merging_benchmark: {tasks=} must be distinct names from {TARGETS}")
    for name, v in (("train_size", train_size), ("test_size", test_size)):
        if v < 10:
            raise ValueError(f"merging_benchmark: {name}={v} must be >= 10")
    if not 30 <= source_size <= 2000:
        raise ValueError(f"merging_benchmark: {source_size=} must be in [30, 2000]")
    if max_shift < 0:
        raise ValueError(f"merging_benchmark: {max_shift=} must be >= 0")

    x, y = load_mnist5k()
    order = _rng(seed, "mnist-order").permutation(len(y))
    x, y = x[order], y[order]
    n_left = len(y) - source_size
    n_test_pool = n_left // 4
    pools = {
        "source": (x[:source_size], y[:source_size]),
        "train": (x[source_size : len(y) - n_test_pool], y[source_size : len(y) - n_test_pool]),
        "test": (x[len(y) - n_test_pool :], y[len(y) - n_test_pool :]),
    }
    if train_size > len(pools["train"][1]) or test_size > n_test_pool:
        raise ValueError(
            f"merging_benchmark: {train_size=}/{test_size=} exceed the MNIST pools "
            f"({len(pools['train'][1])} train, {n_test_pool} test images)"
        )
    g = _rng(seed, "patch-permutation")
    perm = g.permutation(16)
    while np.any(perm == np.arange(16)):  # every tile moves
        perm = g.permutation(16)

    # Source: upright digits with small random translations, its own 70/10/20 split.
    xs, ys = pools["source"]
    xs = translate(xs, _rng(seed, "source-shift").integers(-max_shift, max_shift + 1, (len(ys), 2)))
    n_test = len(ys) // 5
    source = _make_task(
        "source",
        _DIGITS,
        xs[n_test:],
        ys[n_test:],
        xs[:n_test],
        ys[:n_test],
        val_fraction=1 / 8,
        seed=seed,
    )

    def draw(pool: str, n: int, name: str):
        xp, yp = pools[pool]
        idx = np.sort(_rng(seed, f"{name}-{pool}").choice(len(yp), n, replace=False))
        return xp[idx], yp[idx]

    transforms = {
        "mnist": lambda a: a,
        "rotated": lambda a: rotate(a, 1),
        "inverted": invert,
        "patches": lambda a: permute_patches(a, perm),
        "parity": lambda a: rotate(a, 2),
        "flipped": lambda a: np.ascontiguousarray(a[:, :, ::-1]),
    }
    out = []
    for name in tasks:
        if name == "digits":
            xd, yd = load_digits()
            if train_size + test_size > len(yd):
                raise ValueError(
                    f"merging_benchmark: {train_size=} + {test_size=} exceed the {len(yd)} "
                    "scikit-learn digits"
                )
            o = _rng(seed, "digits-order").permutation(len(yd))
            xd, yd = upscale_digits(xd[o]), yd[o]
            xtr, ytr = xd[:train_size], yd[:train_size]
            xte, yte = (
                xd[train_size : train_size + test_size],
                yd[train_size : train_size + test_size],
            )
            classes = _DIGITS
        else:
            (xtr, ytr), (xte, yte) = draw("train", train_size, name), draw("test", test_size, name)
            xtr, xte = transforms[name](xtr), transforms[name](xte)
            classes = _DIGITS
            if name == "parity":
                ytr, yte, classes = ytr % 2, yte % 2, ("even", "odd")
        out.append(
            _make_task(name, classes, xtr, ytr, xte, yte, val_fraction=val_fraction, seed=seed)
        )
    return MergingBenchmark(source, tuple(out), seed, perm)
