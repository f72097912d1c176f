"""Procedural drawing: glyphs, shapes and textures as masks and colour layers (numpy + PIL).

The pieces from which the pretraining corpus (:mod:`cljax.data._corpus`) and the embedded
benchmark (:mod:`cljax.data._embedded`) compose their images. Everything is a pure function
of its arguments and of a ``numpy.random.Generator``, so an image is fixed by its seed.
Masks are drawn at twice the output size and box-filtered down (anti-aliasing).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

__all__ = [
    "COLOURS",
    "DIGIT_NAMES",
    "GREEK",
    "HELDOUT_FONTS",
    "PRETRAIN_FONTS",
    "SHAPES",
    "TEXTURES",
    "font_path",
    "glyph_mask",
    "shape_mask",
    "texture",
]

# Named colours of the captions (sRGB, 0-255). Draws jitter each channel a little.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "pink": (245, 120, 190),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (130, 80, 35),
}

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Greek lower case (final sigma left out): the letter and its English name.
GREEK: tuple[tuple[str, str], ...] = tuple(
    zip(
        "αβγδεζηθικλμνξοπρστυφχψω",
        (
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
            "pi rho sigma tau upsilon phi chi psi omega"
        ).split(),
        strict=True,
    )
)

SHAPES = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "hexagon",
    "cross",
    "ring",
    "heart",
    "arrow",
)

TEXTURES = ("stripes", "checks", "dots", "grid", "waves", "rings", "zigzag", "speckles")

# Fonts that ship with matplotlib. The corpus draws glyphs in the first group only; the
# benchmark's procedural glyph tasks use the second (slanted, monospaced bold, Computer
# Modern bold/italic/typewriter), so no downstream glyph is drawn in a pretraining font.
# ``cmr10``/``cmss10`` have no Greek and serve Latin letters and digits only.
PRETRAIN_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
)
HELDOUT_FONTS = (
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
    "cmtt10.ttf",
)
LATIN_ONLY = frozenset({"cmr10.ttf", "cmss10.ttf", "cmb10.ttf", "cmti10.ttf", "cmtt10.ttf"})

_SS = 2  # supersampling factor of masks


def font_path(name: str) -> str:
    """Absolute path of one of matplotlib's bundled TrueType fonts."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"font {name!r} is not bundled with this matplotlib ({path})")
    return path


@functools.lru_cache(maxsize=512)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(font_path(name), size)


def _downsample(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // _SS, _SS, w // _SS, _SS).mean(axis=(1, 3))


def glyph_mask(
    char: str,
    font: str,
    *,
    size: int,
    height: float,
    centre: tuple[float, float],
    angle: float = 0.0,
    outline: int = 0,
) -> np.ndarray:
    """Coverage ``[size, size]`` in [0, 1] of one character.

    Args:
      char: the character.
      font: a bundled font file name (see :data:`PRETRAIN_FONTS`).
      size: output side in pixels.
      height: the glyph's em height in output pixels.
      centre: ``(x, y)`` of the glyph's centre in output pixels.
      angle: rotation in degrees, counter-clockwise.
      outline: if positive, only a stroke of this width (supersampled pixels) around the
        glyph is drawn (a hollow letter).
    """
    from PIL import Image, ImageDraw

    s = size * _SS
    img = Image.new("L", (2 * s, 2 * s), 0)
    draw = ImageDraw.Draw(img)
    f = _font(font, max(4, int(round(height * _SS))))
    if not outline:
        draw.text((s, s), char, fill=255, font=f, anchor="mm")
    else:
        draw.text(
            (s, s), char, fill=255, font=f, anchor="mm", stroke_width=outline, stroke_fill=255
        )
        inner = Image.new("L", img.size, 0)
        ImageDraw.Draw(inner).text((s, s), char, fill=255, font=f, anchor="mm")
        arr = np.asarray(img, np.float32) - np.asarray(inner, np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    cx, cy = centre
    left, top = int(round(s - cx * _SS)), int(round(s - cy * _SS))
    img = img.crop((left, top, left + s, top + s))
    return _downsample(np.asarray(img, np.float32) / 255.0)


def _regular(n: int, r: float, cx: float, cy: float, phase: float) -> list[tuple[float, float]]:
    t = phase + 2 * np.pi * np.arange(n) / n
    return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in t]


def shape_mask(
    shape: str,
    *,
    size: int,
    radius: float,
    centre: tuple[float, float],
    angle: float = 0.0,
    outline: int = 0,
    squash: float = 1.0,
) -> np.ndarray:
    """Coverage ``[size, size]`` in [0, 1] of a geometric shape of :data:`SHAPES`.

    Args:
      shape: the shape's name.
      size: output side in pixels.
      radius: half the shape's extent in output pixels.
      centre: ``(x, y)`` in output pixels.
      angle: rotation in degrees.
      outline: if positive, the outline only, this many supersampled pixels wide.
      squash: vertical scale (a perspective-like squash when below 1).
    """
    from PIL import Image, ImageDraw

    s = size * _SS
    c = s  # draw centred on a 2s canvas, then rotate and crop
    r = radius * _SS
    img = Image.new("L", (2 * s, 2 * s), 0)
    d = ImageDraw.Draw(img)
    kw: dict[str, Any] = (
        {"fill": None, "outline": 255, "width": outline} if outline else {"fill": 255}
    )
    box = (c - r, c - r, c + r, c + r)
    if shape == "circle":
        d.ellipse(box, **kw)
    elif shape == "ring":
        d.ellipse(box, fill=None, outline=255, width=max(outline, int(r * 0.35)))
    elif shape == "square":
        q = r * 0.85
        d.rectangle((c - q, c - q, c + q, c + q), **kw)
    elif shape == "triangle":
        d.polygon(_regular(3, r, c, c + r * 0.2, np.pi / 2), **kw)
    elif shape == "diamond":
        d.polygon(_regular(4, r, c, c, np.pi / 2), **kw)
    elif shape == "hexagon":
        d.polygon(_regular(6, r, c, c, 0.0), **kw)
    elif shape == "star":
        outer = _regular(5, r, c, c, np.pi / 2)
        inner = _regular(5, r * 0.42, c, c, np.pi / 2 + np.pi / 5)
        d.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], **kw)
    elif shape == "cross":
        w = r * 0.35
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r)]
        pts += [(-w, w), (-r, w), (-r, -w), (-w, -w)]
        d.polygon([(c + x, c + y) for x, y in pts], **kw)
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        k = r / 17.0
        d.polygon([(c + k * a, c - k * b - r * 0.1) for a, b in zip(x, y, strict=True)], **kw)
    elif shape == "arrow":
        w, h = r * 0.3, r * 0.45
        pts = [(-r, -w), (r - 2 * h, -w), (r - 2 * h, -2 * w), (r, 0), (r - 2 * h, 2 * w)]
        pts += [(r - 2 * h, w), (-r, w)]
        d.polygon([(c + x, c + y) for x, y in pts], **kw)
    else:
        raise ValueError(f"{shape=} is not one of {SHAPES}")
    if squash != 1.0:
        h = max(1, int(round(2 * s * squash)))
        squashed = img.resize((2 * s, h), Image.Resampling.BILINEAR)
        img = Image.new("L", (2 * s, 2 * s), 0)
        img.paste(squashed, (0, (2 * s - h) // 2))
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    cx, cy = centre
    left, top = int(round(c - cx * _SS)), int(round(c - cy * _SS))
    img = img.crop((left, top, left + s, top + s))
    return _downsample(np.asarray(img, np.float32) / 255.0)


def texture(
    kind: str,
    *,
    size: int,
    period: float,
    angle: float,
    rng: np.random.Generator,
    warp: float = 0.0,
) -> np.ndarray:
    """A two-tone pattern ``[size, size]`` in [0, 1] (1 = foreground colour).

    Args:
      kind: one of :data:`TEXTURES`.
      size: side in pixels.
      period: the pattern's period in pixels.
      angle: orientation in degrees.
      rng: for phases, centres and the speckles.
      warp: amplitude (pixels) of a smooth sinusoidal warp of the coordinates.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if warp:
        f1, f2 = rng.uniform(0.08, 0.2, 2)
        p1, p2 = rng.uniform(0, 2 * np.pi, 2)
        xx, yy = xx + warp * np.sin(f1 * yy + p1), yy + warp * np.sin(f2 * xx + p2)
    a = np.deg2rad(angle)
    u = xx * np.cos(a) + yy * np.sin(a) + rng.uniform(0, period)
    v = -xx * np.sin(a) + yy * np.cos(a) + rng.uniform(0, period)
    p = period
    if kind == "stripes":
        m = (u % p) < p / 2
    elif kind == "checks":
        m = ((np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2) == 0
    elif kind == "dots":
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        m = du**2 + dv**2 < (0.3 * p) ** 2
    elif kind == "grid":
        w = max(1.0, 0.2 * p)
        m = ((u % p) < w) | ((v % p) < w)
    elif kind == "waves":
        m = np.sin(2 * np.pi * (v / p + 0.25 * np.sin(2 * np.pi * u / (2 * p)))) > 0
    elif kind == "rings":
        cx, cy = rng.uniform(0, size, 2)
        m = (np.hypot(xx - cx, yy - cy) % p) < p / 2
    elif kind == "zigzag":
        m = ((v + np.abs((u % p) - p / 2)) % p) < p / 2
    elif kind == "speckles":
        m = rng.random((size, size)) < 0.3
    else:
        raise ValueError(f"{kind=} is not one of {TEXTURES}")
    return m.astype(np.float32)


def colour(name: str, rng: np.random.Generator, jitter: float = 18.0) -> np.ndarray:
    """The RGB (float, 0-255) of a named colour with a small random jitter."""
    base = np.asarray(COLOURS[name], np.float32)
    return np.clip(base + rng.normal(0.0, jitter, 3), 0, 255)


def composite(background: np.ndarray, mask: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Paints colour (or colour image) ``fg`` over ``background`` [H, W, 3] with coverage ``mask``."""
    m = mask[..., None]
    return background * (1.0 - m) + np.broadcast_to(fg, background.shape) * m


def two_tone(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """An image [H, W, 3] of colour ``a`` where ``mask`` is 1 and ``b`` where it is 0."""
    m = mask[..., None]
    return a * m + b * (1.0 - m)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
