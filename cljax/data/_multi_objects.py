"""Multi-task data sets drawn by the procedural renderer: Multi-Shapes and glyph attributes.

Two families with the interface of :func:`cljax.data.generate_multi_mnist` (tuples of
:class:`~cljax.data.Task` objects that share their images, rendered when indexed):

* :func:`generate_multi_shapes`, the Multi-Fashion analogue: Multi-MNIST's construction
  (two objects on a 36×36 canvas, one shifted up-left and one down-right, max-merged)
  over filled, textured geometric shapes instead of digits, as Multi-Fashion-MNIST puts
  clothing where Multi-MNIST puts digits;
* :func:`generate_glyph_attributes`: one coloured glyph per image with several labels
  (which digit, its colour, its fill style), tasks that ask for different features of
  the same image.

Everything is drawn by :mod:`cljax.data._render` from numpy generators seeded by
``seed`` (no file, no download): the same seed gives the same images on every machine
with the same numpy and Pillow.
"""

from __future__ import annotations

import functools

import numpy as np

from cljax.data import _render as R
from cljax.data._multi_mnist import (
    _DIGITS,
    MultiDigitImages,
    check_layout,
    left_right_tasks,
    split_tasks,
)
from cljax.data._task import Task

__all__ = [
    "ATTRIBUTE_COLOURS",
    "ATTRIBUTE_STYLES",
    "GlyphAttributeImages",
    "generate_glyph_attributes",
    "generate_multi_shapes",
]

_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # of each class's objects: train / val / test


def _check_counts(fn: str, num_train: int, num_val: int, num_test: int) -> None:
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"{fn}: {name}={n!r} must be an int >= 1")


def _per_split(total: int) -> tuple[int, int, int]:
    val = max(1, int(round(total * _SPLIT_FRACTIONS[1])))
    test = max(1, int(round(total * _SPLIT_FRACTIONS[2])))
    return total - val - test, val, test


def _shape_object(rng: np.random.Generator, shape: str) -> np.ndarray:
    """One 28×28 grey object in [0, 1]: a shape with a random size, tilt, squash and fill
    (solid, two-tone texture or vertical gradient), the variation a clothing class has."""
    mask = R.shape_mask(
        shape,
        size=28,
        radius=float(rng.uniform(8.5, 12.5)),
        centre=tuple(14.0 + rng.uniform(-1.5, 1.5, 2)),
        # small tilts only: a square turned by 45 degrees is a diamond
        angle=float(rng.uniform(-15.0, 15.0)),
        squash=float(rng.uniform(0.75, 1.0)),
    )
    fill = int(rng.integers(3))
    if fill == 0:
        tone = np.full((28, 28), rng.uniform(0.55, 1.0), np.float32)
    elif fill == 1:
        kind = R.TEXTURES[int(rng.integers(len(R.TEXTURES)))]
        t = R.texture(
            kind,
            size=28,
            period=float(rng.uniform(3.0, 6.0)),
            angle=float(rng.uniform(0, 180)),
            rng=rng,
        )
        hi, lo = rng.uniform(0.7, 1.0), rng.uniform(0.25, 0.5)
        tone = (hi * t + lo * (1.0 - t)).astype(np.float32)
    else:
        top, bottom = rng.uniform(0.35, 0.7), rng.uniform(0.8, 1.0)
        if rng.random() < 0.5:
            top, bottom = bottom, top
        tone = np.repeat(np.linspace(top, bottom, 28, dtype=np.float32)[:, None], 28, axis=1)
    return (mask * tone).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _shape_pools(seed: int, objects_per_class: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per split: ``(objects [P, 28, 28], labels [P])``, separate renderings per split."""
    counts = _per_split(objects_per_class)
    out = []
    for s, n in enumerate(counts):
        rng = np.random.default_rng([seed, 11, s])
        x = np.stack([_shape_object(rng, shape) for shape in R.SHAPES for _ in range(n)])
        y = np.repeat(np.arange(len(R.SHAPES), dtype=np.int32), n)
        x.setflags(write=False)
        y.setflags(write=False)
        out.append((x, y))
    return tuple(out)


def generate_multi_shapes(
    num_train: int = 60000,
    num_val: int = 5000,
    num_test: int = 10000,
    *,
    objects_per_class: int = 500,
    size: int = 36,
    max_shift: int = 2,
    seed: int = 0,
) -> tuple[Task, Task]:
    """Multi-Shapes: Multi-MNIST's construction over textured shapes (a Multi-Fashion analogue).

    Multi-Fashion-MNIST (Lin et al., 2019) keeps Multi-MNIST's layout and replaces the
    digits with Fashion-MNIST's clothing: filled objects whose class is their outline and
    whose inside varies. Here the objects are the ten shapes of the procedural renderer
    (circle, square, triangle, diamond, star, hexagon, cross, ring, heart, arrow), each
    28×28 grey with a random size, small tilt, vertical squash and a fill that is solid,
    a two-tone texture or a gradient. Each image pastes one object at offsets ``(dy, dx)``
    and another at ``size - 28 - max_shift + (dy', dx')``, offsets uniform in ``[0,
    max_shift]``, merged by a pixel-wise maximum; task ``"left"`` labels the up-left
    object and ``"right"`` the down-right one. The default ``max_shift=2`` is
    :func:`generate_multi_mnist`'s: the right box starts 4 to 8 px below and right of the
    left one, 6 on average, the fixed offset of Sener & Koltun's Multi-MNIST code.

    Each class has ``objects_per_class`` renderings, split 70 / 10 / 20 % between train,
    validation and test (drawn separately), so a test image never repeats a training
    object; the images pair them at random and are rendered when indexed (the tasks' ``x``
    are :class:`~cljax.data.MultiDigitImages`).

    Args:
      num_train: training images.
      num_val: validation images.
      num_test: test images.
      objects_per_class: renderings of each shape, ``>= 10`` (split between the splits).
      size: canvas side, ``>= 28 + max_shift``.
      max_shift: largest shift of each object, in pixels, ``>= 0`` (4: the boxes 0 to 8 px
        apart, a harder layout where the objects can sit on each other).
      seed: seed of the renderings and every draw.

    Returns:
      ``(left, right)``: two :class:`~cljax.data.Task` objects of 10 classes sharing their
      images (float32 ``[N, size, size, 1]`` in [0, 1]).

    Raises:
      ValueError: on a count below 1, ``objects_per_class`` below 10, a negative shift or
        a canvas too small for it.

    Example::

      >>> left, right = generate_multi_shapes(2000, 200, 500, objects_per_class=50)
      >>> left.classes[:3]  # ('circle', 'square', 'triangle')

    References:
      Sabour et al., "Dynamic Routing Between Capsules", NeurIPS 2017 (Multi-MNIST). Lin
      et al., "Pareto Multi-Task Learning", NeurIPS 2019 (Multi-Fashion).
    """
    fn = "generate_multi_shapes"
    _check_counts(fn, num_train, num_val, num_test)
    if isinstance(objects_per_class, bool) or not isinstance(objects_per_class, int | np.integer):
        raise ValueError(f"{fn}: objects_per_class={objects_per_class!r} must be an int >= 10")
    if objects_per_class < 10:
        raise ValueError(f"{fn}: {objects_per_class=} must be >= 10")
    check_layout(fn, size, max_shift)
    pools = _shape_pools(seed, int(objects_per_class))
    xs, ys = [], []
    for s, n in enumerate((num_train, num_val, num_test)):
        pool, pool_y = pools[s]
        rng = np.random.default_rng([seed, 12, s])
        left, right = rng.integers(0, len(pool_y), (2, n))
        shifts = rng.integers(0, max_shift + 1, (n, 4))
        xs.append(MultiDigitImages(pool, pool_y, left, right, shifts, size, max_shift))
        ys.append((pool_y[left], pool_y[right]))
    return left_right_tasks(R.SHAPES, xs, ys)


# The colours and fill styles of generate_glyph_attributes (far apart under the jitter).
ATTRIBUTE_COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
ATTRIBUTE_STYLES = ("solid", "hollow", "striped", "checkered")
_ATTR_SIZE = 32


@functools.lru_cache(maxsize=4)
def _glyph_pools(seed: int, glyphs_per_class: int):
    """Per split: ``(solid [P, 32, 32], hollow [P, 32, 32], digit [P], font [P])``: each
    digit drawn ``glyphs_per_class`` times (held-out fonts, random height, tilt, offset),
    filled and as an outline, split 70 / 10 / 20 % with separate renderings."""
    counts = _per_split(glyphs_per_class)
    out = []
    for s, n in enumerate(counts):
        rng = np.random.default_rng([seed, 21, s])
        solid, hollow, digit, font = [], [], [], []
        for d in range(10):
            for _ in range(n):
                f = int(rng.integers(len(R.HELDOUT_FONTS)))
                kw = dict(
                    size=_ATTR_SIZE,
                    height=float(rng.uniform(22.0, 28.0)),
                    centre=tuple(16.0 + rng.uniform(-2.0, 2.0, 2)),
                    angle=float(rng.uniform(-12.0, 12.0)),
                )
                solid.append(R.glyph_mask(str(d), R.HELDOUT_FONTS[f], **kw))
                hollow.append(R.glyph_mask(str(d), R.HELDOUT_FONTS[f], outline=3, **kw))
                digit.append(d)
                font.append(f)
        arrays = (
            np.stack(solid).astype(np.float32),
            np.stack(hollow).astype(np.float32),
            np.asarray(digit, np.int32),
            np.asarray(font, np.int32),
        )
        for a in arrays:
            a.setflags(write=False)
        out.append(arrays)
    return tuple(out)


class GlyphAttributeImages:
    """Images of :func:`generate_glyph_attributes` rendered on access: array-like
    ``[N, 32, 32, 3]`` float32 in [0, 1].

    Image ``n`` paints glyph ``glyph[n]`` of the pool (its outline when ``style[n]`` is
    hollow, its solid mask times stripes or checks for the textured styles) in
    ``colour_rgb[n]`` over the grey background ``background[n]``. Indexing by an int, a
    slice or an index array renders those images only; ``np.asarray`` renders all.

    Attributes:
      solid, hollow: ``[P, 32, 32]`` coverage masks of the pool's glyphs.
      glyph: ``[N]`` pool index of each image's glyph.
      style: ``[N]`` index into :data:`ATTRIBUTE_STYLES`.
      colour_rgb: ``[N, 3]`` foreground colour in [0, 1].
      background: ``[N]`` background grey level in [0, 1].
      pattern: ``[N, 3]`` period (pixels), angle (degrees) and phase of the textured fills.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, solid, hollow, glyph, style, colour_rgb, background, pattern):
        self.solid, self.hollow = solid, hollow
        self.glyph, self.style = glyph, style
        self.colour_rgb, self.background, self.pattern = colour_rgb, background, pattern
        yy, xx = np.mgrid[0:_ATTR_SIZE, 0:_ATTR_SIZE].astype(np.float32) + 0.5
        self._yy, self._xx = yy, xx

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.glyph), _ATTR_SIZE, _ATTR_SIZE, 3)

    def __len__(self) -> int:
        return len(self.glyph)

    def _mask(self, n: int) -> np.ndarray:
        style = int(self.style[n])
        if style == 1:
            return self.hollow[self.glyph[n]]
        mask = self.solid[self.glyph[n]]
        if style == 0:
            return mask
        period, angle, phase = self.pattern[n]
        a = np.deg2rad(angle)
        u = self._xx * np.cos(a) + self._yy * np.sin(a) + phase
        if style == 2:  # stripes
            return mask * ((u % period) < period / 2)
        v = -self._xx * np.sin(a) + self._yy * np.cos(a) + phase
        return mask * (((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2) == 0)

    def _render(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), _ATTR_SIZE, _ATTR_SIZE, 3), np.float32)
        for k, n in enumerate(idx):
            m = self._mask(int(n))[..., None]
            out[k] = self.background[n] * (1.0 - m) + self.colour_rgb[n] * m
        return out

    def __getitem__(self, item):
        if isinstance(item, int | np.integer):
            return self._render(np.arange(len(self))[np.asarray([item])])[0]
        if isinstance(item, tuple):
            return self[item[0]][(slice(None), *item[1:])]
        return self._render(np.arange(len(self))[item].reshape(-1))

    def __array__(self, dtype=None, copy=None):
        x = self._render(np.arange(len(self)))
        return x if dtype is None else x.astype(dtype)


def generate_glyph_attributes(
    num_train: int = 60000,
    num_val: int = 5000,
    num_test: int = 10000,
    *,
    glyphs_per_class: int = 100,
    seed: int = 0,
) -> tuple[Task, Task, Task]:
    """Glyph attributes: one coloured digit per image and three labels of it.

    Each 32×32 RGB image shows one digit glyph in a held-out font (none of them drawn by
    the pretraining corpus) at a random height, tilt and offset, painted in one of
    :data:`ATTRIBUTE_COLOURS` (with a small per-image jitter) in one of
    :data:`ATTRIBUTE_STYLES` (filled, outline only, filled with stripes or with checks of a
    random period and angle) on a grey background. Three tasks label the same image:
    ``"content"`` (the digit, 10 classes), ``"colour"`` (6) and ``"style"`` (4). Content
    wants features invariant to colour and fill, colour and style want exactly those: the
    tasks share an input but not what they need from it, as attribute tasks of one image do
    (CelebA's attributes, or Multi-MNIST's left and right).

    Each digit has ``glyphs_per_class`` renderings, split 70 / 10 / 20 % between train,
    validation and test (drawn separately); colour, style, background and pattern are
    drawn per image, independently of the digit. Images are rendered when indexed (the
    tasks' ``x`` are :class:`GlyphAttributeImages`).

    Args:
      num_train: training images.
      num_val: validation images.
      num_test: test images.
      glyphs_per_class: renderings of each digit, ``>= 10``.
      seed: seed of the renderings and every draw.

    Returns:
      ``(content, colour, style)``: three :class:`~cljax.data.Task` objects sharing their
      images (float32 ``[N, 32, 32, 3]`` in [0, 1]).

    Raises:
      ValueError: on a count below 1 or ``glyphs_per_class`` below 10.

    Example::

      >>> content, colour, style = generate_glyph_attributes(1000, 100, 200, glyphs_per_class=20)
      >>> content.x_train[:4].shape  # (4, 32, 32, 3)
    """
    fn = "generate_glyph_attributes"
    _check_counts(fn, num_train, num_val, num_test)
    if isinstance(glyphs_per_class, bool) or not isinstance(glyphs_per_class, int | np.integer):
        raise ValueError(f"{fn}: glyphs_per_class={glyphs_per_class!r} must be an int >= 10")
    if glyphs_per_class < 10:
        raise ValueError(f"{fn}: {glyphs_per_class=} must be >= 10")
    pools = _glyph_pools(seed, int(glyphs_per_class))
    base = np.asarray([R.COLOURS[c] for c in ATTRIBUTE_COLOURS], np.float32)
    xs, ys = [], []
    for s, n in enumerate((num_train, num_val, num_test)):
        solid, hollow, digit, _ = pools[s]
        rng = np.random.default_rng([seed, 22, s])
        glyph = rng.integers(0, len(digit), n)
        colour = rng.integers(0, len(ATTRIBUTE_COLOURS), n).astype(np.int32)
        style = rng.integers(0, len(ATTRIBUTE_STYLES), n).astype(np.int32)
        rgb = np.clip(base[colour] + rng.normal(0.0, 12.0, (n, 3)), 0, 255) / 255.0
        # grey backgrounds away from the foreground colours' range (dark or mid grey)
        background = rng.uniform(0.0, 0.45, n).astype(np.float32)
        pattern = np.stack(
            [rng.uniform(5.0, 8.0, n), rng.uniform(0.0, 180.0, n), rng.uniform(0.0, 8.0, n)], 1
        ).astype(np.float32)
        images = GlyphAttributeImages(
            solid, hollow, glyph, style, rgb.astype(np.float32), background, pattern
        )
        xs.append(images)
        ys.append((digit[glyph], colour, style))
    classes = (_DIGITS, ATTRIBUTE_COLOURS, ATTRIBUTE_STYLES)
    content, colour_task, style_task = split_tasks(("content", "colour", "style"), classes, xs, ys)
    return content, colour_task, style_task
