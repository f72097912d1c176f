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

from cljax.data._benchmarks import merging_benchmark
from cljax.data._sources import load_mnist1d
from cljax.data._task import Task

__all__ = [
    "MTIL_TASKS",
    "MtilSequence",
    "mtil_domain_tasks",
    "mtil_pretraining_data",
    "mtil_reference_images",
    "mtil_sequence",
    "render_strokes",
]

#: The domain-shifted tasks of the merging benchmark used as the MTIL sequence (its upright
#: ``mnist`` task is left out: it is the pretraining domain).
MTIL_TASKS = ("rotated", "inverted", "patches", "digits", "parity")


def mtil_pretraining_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The pretraining source: the merging benchmark's source task (upright, translated MNIST
    on images of its own), train split.

    Args:
      seed: the benchmark's seed.

    Returns:
      ``(x, y)``: float32 ``[N, 28, 28, 1]`` in [0, 1], int32 labels.
    """
    src = merging_benchmark(seed, tasks=MTIL_TASKS).source
    return src.x_train, src.y_train


def mtil_domain_tasks(seed: int = 0) -> tuple[Task, ...]:
    """The five domain-shifted digit tasks of :func:`~cljax.data.merging_benchmark`.

    ``rotated``, ``inverted`` and ``patches`` (7x7 patches shuffled) MNIST, scikit-learn's
    ``digits`` upscaled to 28x28, and MNIST ``parity`` (2 classes); none shares an image with
    the pretraining source (:func:`mtil_pretraining_data`).

    Args:
      seed: the benchmark's seed.

    Returns:
      The tasks, in this order.
    """
    return tuple(merging_benchmark(seed, tasks=MTIL_TASKS).tasks)


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
