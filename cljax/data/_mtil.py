"""An MTIL-style embedded sequence: domain-shifted digit tasks and an unlabelled reference set.

MTIL (multi-domain task-incremental learning, ZSCL) trains one model on a sequence of
datasets from different domains and measures, besides the usual forgetting, how much
zero-shot ability on the *upcoming* datasets survives (Transfer). The embedded version
uses the tasks of the merging benchmark: a pretrained encoder with each task's frozen head
gives the "zero-shot" accuracy on a task before it is trained, exactly as CLIP with its
zero-shot text head does.

ZSCL distils on reference images from a source unrelated to the tasks (ImageNet for a
sequence of fine-grained datasets). Here the reference set is MNIST-1D rendered to images:
procedurally generated 1-D signals drawn as bright strokes on a dark 28x28 canvas. It
shares the low-level statistics of the digit tasks (thin strokes, same value range, same
size), so the encoder's features on it are meaningful, but it holds no digit and no label
and shares no image with any task: it constrains the feature map in general without
replaying task data, the role ImageNet plays for CLIP.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from cljax.data._sources import load_digits, load_mnist1d, load_mnist5k
from cljax.data._task import Task

__all__ = [
    "MtilSequence",
    "mtil_domain_tasks",
    "mtil_pretraining_data",
    "mtil_reference_images",
    "mtil_sequence",
    "render_strokes",
]

DIGITS = tuple(str(d) for d in range(10))
# MNIST-5k is sorted by label: a fixed shuffle, then the first part is the pretraining
# source and the rest feeds the domain-shifted tasks (no image is in both).
_NUM_PRETRAIN = 2000


def _mnist_split(
    seed: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    x, y = load_mnist5k()
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm][..., None], y[perm]
    return (x[:_NUM_PRETRAIN], y[:_NUM_PRETRAIN]), (x[_NUM_PRETRAIN:], y[_NUM_PRETRAIN:])


def mtil_pretraining_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The pretraining source: 2,000 upright MNIST-5k digits (none is in a task).

    Returns:
      ``(x, y)``: float32 ``[2000, 28, 28, 1]`` in [0, 1], int32 labels.
    """
    return _mnist_split(seed)[0]


def _patch_permute(x: np.ndarray, patch: int, seed: int) -> np.ndarray:
    n, h, w, c = x.shape
    g = h // patch
    blocks = (
        x.reshape(n, g, patch, g, patch, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, g * g, patch, patch, c)
    )
    blocks = blocks[:, np.random.default_rng(seed).permutation(g * g)]
    return blocks.reshape(n, g, g, patch, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def _upscale_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, bilinearly upscaled to 20x20 and centred on 28x28 as MNIST."""
    x, y = load_digits()
    src = np.linspace(0, 7, 20)
    i0 = np.clip(np.floor(src).astype(int), 0, 6)
    f = src - i0
    rows = x[:, i0] * (1 - f)[None, :, None] + x[:, i0 + 1] * f[None, :, None]
    img = rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]
    out = np.zeros((len(x), 28, 28, 1), np.float32)
    out[:, 4:24, 4:24, 0] = img
    return out, y


def _task(name, classes, x, y, seed, n_val, n_test) -> Task:
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm].astype(np.int32)
    te, va = slice(0, n_test), slice(n_test, n_test + n_val)
    tr = slice(n_test + n_val, None)
    return Task(name, classes, x[tr], y[tr], x[va], y[va], x[te], y[te])


def mtil_domain_tasks(seed: int = 0) -> tuple[Task, ...]:
    """Five digit tasks from different domains, none sharing an image with pretraining.

    * ``rotated``: MNIST rotated by 90 degrees;
    * ``inverted``: MNIST with inverted intensities;
    * ``patches``: MNIST with its 7x7 patches shuffled by a fixed permutation;
    * ``digits``: scikit-learn's digits upscaled to 28x28 (another source);
    * ``parity``: upright MNIST relabelled even/odd (2 classes).

    MNIST tasks hold 2,200 train, 200 val, 600 test images (the 3,000 MNIST-5k images
    left after pretraining, shuffled per task); ``digits`` 1,147 / 150 / 500.

    Args:
      seed: seed of the splits.

    Returns:
      The tasks, in this order.
    """
    _, (x, y) = _mnist_split(0)
    dx, dy = _upscale_digits()
    return (
        _task("rotated", DIGITS, np.rot90(x, 1, axes=(1, 2)), y, seed + 1, 200, 600),
        _task("inverted", DIGITS, 1.0 - x, y, seed + 2, 200, 600),
        _task("patches", DIGITS, _patch_permute(x, 7, 12345), y, seed + 3, 200, 600),
        _task("digits", DIGITS, dx, dy, seed + 4, 150, 500),
        _task("parity", ("even", "odd"), x, y % 2, seed + 5, 200, 600),
    )


def render_strokes(
    signals: np.ndarray,
    *,
    size: int = 28,
    margin: int = 4,
    width: float = 0.7,
    supersample: int = 4,
) -> np.ndarray:
    """Draws 1-D signals as continuous strokes on a square canvas.

    Each signal is resampled across the ``size - 2 * margin`` central columns, scaled to
    the central rows (its own peak at the border of that box), and every segment between
    consecutive samples is drawn with a Gaussian profile of std ``width`` pixels, so steep
    parts stay connected.

    Args:
      signals: ``[N, L]`` float signals, ``L >= 2``.
      size: canvas side in pixels.
      margin: empty border in pixels (MNIST keeps its digits in the central 20x20).
      width: stroke half-width (Gaussian std) in pixels, ``> 0``.
      supersample: segments per column, ``>= 1``.

    Returns:
      float32 ``[N, size, size, 1]`` in [0, 1].

    Raises:
      ValueError: for a malformed signal array or canvas.

    Example:
      >>> render_strokes(np.sin(np.linspace(0, 6, 40))[None]).shape
      (1, 28, 28, 1)
    """
    signals = np.asarray(signals, np.float64)
    if signals.ndim != 2 or signals.shape[1] < 2:
        raise ValueError(f"render_strokes: signals must be [N, L] with L >= 2; got {signals.shape}")
    span = size - 2 * margin
    if margin < 0 or span < 2:
        raise ValueError(f"render_strokes: {size=} and {margin=} leave no room to draw")
    if not width > 0 or supersample < 1:
        raise ValueError(f"render_strokes: {width=} must be > 0 and {supersample=} >= 1")
    n, length = signals.shape
    t = np.linspace(0, length - 1, span * supersample + 1)
    sig = (
        np.stack([np.interp(t, np.arange(length), s) for s in signals])
        if n
        else np.zeros((0, len(t)))
    )
    sig = sig / (np.abs(sig).max(axis=1, keepdims=True) + 1e-6)
    rows_at = (size - 1) / 2 - sig * (span / 2 - 1)  # row coordinate of each sample
    lo = np.minimum(rows_at[:, :-1], rows_at[:, 1:])[:, None, :]
    hi = np.maximum(rows_at[:, :-1], rows_at[:, 1:])[:, None, :]
    rows = np.arange(size, dtype=np.float64)[None, :, None]
    dist = np.maximum(0.0, np.maximum(lo - rows, rows - hi))  # to the segment [lo, hi]
    ink = np.exp(-0.5 * (dist / width) ** 2).reshape(n, size, span, supersample).max(-1)
    img = np.zeros((n, size, size, 1), np.float32)
    img[:, :, margin : margin + span, 0] = ink
    return img


def mtil_reference_images(num: int = 2000, *, seed: int = 0, size: int = 28) -> np.ndarray:
    """The unlabelled reference set: ``num`` MNIST-1D signals rendered by :func:`render_strokes`.

    Args:
      num: number of images, ``>= 1``.
      seed: MNIST-1D generator seed.
      size: canvas side.

    Returns:
      float32 ``[num, size, size, 1]`` in [0, 1].

    Raises:
      ValueError: if ``num < 1`` (an empty reference set).

    Example:
      >>> mtil_reference_images(8).shape  # doctest: +SKIP
      (8, 28, 28, 1)
    """
    if num < 1:
        raise ValueError(f"mtil_reference_images: {num=} must be >= 1 (empty reference set)")
    return render_strokes(_mnist1d_signals(seed, num), size=size)


@functools.cache
def _mnist1d_signals(seed: int, num: int) -> np.ndarray:
    # make_dataset rounds its 80/20 train/test split; ask for a margin and cut.
    x, _ = load_mnist1d(seed=seed, num_samples=num + num // 4 + 10)
    if len(x) < num:
        raise ValueError(f"MNIST-1D gave {len(x)} signals for {num=}")
    x = x[:num]
    x.setflags(write=False)
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class MtilSequence:
    """A task sequence for continual learning with zero-shot transfer, plus a reference set.

    Attributes:
      tasks: the tasks in training order.
      reference: unlabelled reference images ``[R, ...]`` from another source, same image
        shape as the tasks' inputs.
      reference_source: a short description of where the reference set comes from.
    """

    tasks: tuple[Task, ...]
    reference: np.ndarray
    reference_source: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


def mtil_sequence(
    tasks: Sequence[Task],
    *,
    order: Sequence[str] | None = None,
    num_reference: int = 2000,
    reference_seed: int = 0,
) -> MtilSequence:
    """Orders tasks into an MTIL-style sequence and attaches the reference set.

    Args:
      tasks: the tasks, e.g. those of ``cljax.data.merging_benchmark``; inputs
        ``[N, H, W, 1]`` images with ``H == W``.
      order: task names in training order (all of them, or a subset to select);
        ``None`` keeps the given order.
      num_reference: size of the reference set, ``>= 1``.
      reference_seed: seed of the MNIST-1D generator.

    Returns:
      An :class:`MtilSequence`.

    Raises:
      ValueError: for no tasks, duplicate names, an ``order`` with unknown or repeated
        names, non-square single-channel images, or an empty reference set.

    Example:
      >>> seq = mtil_sequence(merging_benchmark(), num_reference=1000)  # doctest: +SKIP

    References:
      Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
      Vision-Language Models", ICCV 2023 (MTIL); Greydanus, "Scaling down deep learning"
      (MNIST-1D), 2020.
    """
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("mtil_sequence: no tasks")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"mtil_sequence: task names must be unique; got {names}")
    if order is not None:
        order = list(order)
        if not order or len(set(order)) != len(order) or not set(order) <= set(names):
            raise ValueError(f"mtil_sequence: {order=} must name distinct tasks among {names}")
        by_name = {t.name: t for t in tasks}
        tasks = tuple(by_name[n] for n in order)
    shapes = {t.x_train.shape[1:] for t in tasks}
    if len(shapes) != 1:
        raise ValueError(f"mtil_sequence: tasks have different input shapes {sorted(shapes)}")
    (shape,) = shapes
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] != 1:
        raise ValueError(f"mtil_sequence: inputs must be square [H, H, 1] images; got {shape}")
    reference = mtil_reference_images(num_reference, seed=reference_seed, size=shape[0])
    return MtilSequence(
        tasks=tasks,
        reference=reference,
        reference_source=f"MNIST-1D (seed {reference_seed}) rendered as {shape[0]}x{shape[0]} strokes",
    )
