"""The training recipe of the CLIP experiments: task_vectors' cosine schedule with warm-up and
open_clip's training transform (a random resized crop, then CLIP's normalisation), shared by
``experiments.clip_merging``, ``experiments.clip_zscl`` and ``experiments.zscl``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def cosine_lr(base_lr: float, warmup: int, steps: int) -> Callable[[Any], jax.Array]:
    """The learning rate of the references' ``cosine_lr`` (task_vectors and ZSCL,
    ``src/utils.py``) as an optax schedule of the step count ``s`` (0-based)::

        s < warmup:  base_lr · (s + 1) / warmup
        otherwise:   base_lr · (1 + cos(π · (s − warmup) / (steps − warmup))) / 2

    so the first step already has ``base_lr / warmup`` and step ``warmup − 1`` the peak
    (optax's ``warmup_cosine_decay_schedule`` starts at 0 and peaks one step later). With
    ``steps <= warmup`` the rate only warms up, as in the references.

    Raises:
      ValueError: for a negative ``warmup`` or ``steps < 1``.
    """
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"cosine_lr: {warmup=} must be an int >= 0")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"cosine_lr: {steps=} must be an int >= 1")
    span = max(steps - warmup, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = base_lr * (s + 1.0) / max(warmup, 1)
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * (s - warmup) / span)) * base_lr
        return jnp.where(s < warmup, warm, decay)

    return schedule


# open_clip's training transform (``image_transform(is_train=True)``, the preprocessing of
# task_vectors, aTLAS and ZSCL's CLIP): RandomResizedCrop(size, scale=(0.9, 1.0), ratio
# (3/4, 4/3), bicubic), then CLIP's normalisation.
TRAIN_CROP_SCALE = (0.9, 1.0)
TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_boxes(
    rng: np.random.Generator,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = TRAIN_CROP_SCALE,
    ratio: tuple[float, float] = TRAIN_CROP_RATIO,
) -> np.ndarray:
    """``[n, 4]`` crop boxes ``(top, left, h, w)`` drawn as torchvision's
    ``RandomResizedCrop.get_params``: up to 10 tries of an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio (w/h) in ``ratio``, rounded to whole pixels and
    accepted when the box fits, at a uniform position; else the largest centred box whose
    aspect ratio is clamped into ``ratio``.

    Raises:
      ValueError: for a scale outside ``0 < lo <= hi <= 1``, a ratio outside
        ``0 < lo <= hi`` or an empty image.
    """
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{scale=} must satisfy 0 < lo <= hi <= 1")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"{ratio=} must satisfy 0 < lo <= hi")
    if height < 1 or width < 1:
        raise ValueError(f"image of {height=} x {width=} is empty")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = np.empty((n, 4), np.int64)
    for k in range(n):
        for _ in range(10):
            target = area * rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                boxes[k] = (top, left, h, w)
                break
        else:  # the centred fallback
            in_ratio = width / height
            if in_ratio < ratio[0]:
                w, h = width, round(width / ratio[0])
            elif in_ratio > ratio[1]:
                h, w = height, round(height * ratio[1])
            else:
                w, h = width, height
            boxes[k] = ((height - h) // 2, (width - w) // 2, h, w)
    return boxes


@functools.partial(jax.jit, static_argnames=("size",))
def resized_crops(images: jax.Array, boxes: jax.Array, *, size: int) -> jax.Array:
    """Each image's box ``(top, left, h, w)`` resized to ``size x size``: bicubic with
    antialiasing, as one resampling (``jax.image.scale_and_translate``), so boxes are data
    and one compilation serves every draw. ``images`` is float ``[N, H, W, C]``."""

    def one(image, box):
        box = box.astype(jnp.float32)
        scale = jnp.stack([size / box[2], size / box[3]])
        return jax.image.scale_and_translate(
            image,
            (size, size, image.shape[-1]),
            (0, 1),
            scale,
            -box[:2] * scale,
            method="bicubic",
            antialias=True,
        )

    return jax.vmap(one)(images, boxes)


def train_preprocess(
    images: np.ndarray,
    rng: np.random.Generator,
    image_size: int,
    scale: tuple[float, float] = TRAIN_CROP_SCALE,
    ratio: tuple[float, float] = TRAIN_CROP_RATIO,
) -> np.ndarray:
    """open_clip's training transform on a batch ``[N, H, W, C]`` (uint8 or float in
    [0, 1]; grayscale repeated to RGB): a random resized crop per image, then CLIP's
    normalisation. Returns float32 ``[N, image_size, image_size, 3]``."""
    from cljax.data._tfds import CLIP_MEAN, CLIP_STD

    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"train_preprocess expects images [N, H, W, C], got shape {x.shape}")
    x = x.astype(np.float32) / (255.0 if np.issubdtype(x.dtype, np.integer) else 1.0)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n, h, w, _ = x.shape
    boxes = random_resized_crop_boxes(rng, n, h, w, scale, ratio)
    y = jnp.clip(resized_crops(jnp.asarray(x), jnp.asarray(boxes), size=image_size), 0.0, 1.0)
    return np.asarray((y - CLIP_MEAN) / CLIP_STD, np.float32)


class AugmentedTask:
    """A :class:`cljax.data.TFDSTask` whose ``batch_at`` goes through
    :func:`train_preprocess`, with the crops fixed by ``(seed, step)`` (random access, so a
    resumed run sees the same batches). Same examples, splits and order as the plain task.
    """

    def __init__(self, name: str, *, data_dir: str | None, image_size: int, seed: int = 0):
        from cljax.data import TFDSTask

        self._rng: np.random.Generator | None = None
        self.image_size = image_size
        self.task = TFDSTask(
            name, data_dir=data_dir, image_size=image_size, seed=seed, preprocess=self._augment
        )

    def _augment(self, images: np.ndarray) -> np.ndarray:
        if self._rng is None:
            raise RuntimeError("AugmentedTask reads training batches through batch_at only")
        return train_preprocess(images, self._rng, self.image_size)

    def steps_per_epoch(self, batch_size: int, split: str = "train") -> int:
        return self.task.steps_per_epoch(batch_size, split)

    def batch_at(self, step: int, batch_size: int, *, seed: int = 0, split: str = "train") -> dict:
        where = ("train", "val", "test").index(split) if split in ("train", "val", "test") else 3
        self._rng = np.random.default_rng([seed, int(step), where, 0x5EED])
        try:
            return self.task.batch_at(step, batch_size, seed=seed, split=split)
        finally:
            self._rng = None
