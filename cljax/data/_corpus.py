"""The procedural image–text corpus that MiniCLIP is pretrained on.

Each example is a 32×32 RGB image and a caption that names what is drawn and some of its
attributes, in the spirit of web alt-text: a glyph (digit, Latin or Greek letter) in one of
the *pretraining* fonts, a geometric shape, a two-tone texture, or a few copies of a shape,
with colour, size, position, rotation, a plain or textured background and noise. Captions
mention a random subset of the attributes ("a large red digit 7 on the left", "seven",
"a blue and white striped pattern"), so the text tower learns each word from many contexts.

Example ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng([s, i])`` alone: the
corpus is unlimited, random-access and identical on every machine (given the same numpy and
Pillow). No image of a real data set is in it; the embedded benchmark's procedural tasks use
held-out fonts and styles (:mod:`cljax.data._embedded`).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from cljax.data import _render as R

__all__ = [
    "CONCEPTS",
    "CorpusExample",
    "caption_words",
    "corpus_batch",
    "corpus_example",
]

IMAGE_SIZE = 32
_AN = re.compile(r"\ba (?=[aeiou]\w)")  # "a orange" -> "an orange" (not before a lone letter)

DIGITS = tuple("0123456789")
LATIN = tuple("abcdefghijklmnopqrstuvwxyz")
_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a rendering of")
_POSITIONS = {
    (0, 0): "in the top left corner",
    (1, 0): "at the top",
    (2, 0): "in the top right corner",
    (0, 1): "on the left",
    (1, 1): "in the centre",
    (2, 1): "on the right",
    (0, 2): "in the bottom left corner",
    (1, 2): "at the bottom",
    (2, 2): "in the bottom right corner",
}
# Adjective and nouns of each texture, as captions name them.
TEXTURE_WORDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stripes": ("striped", ("stripes",)),
    "checks": ("checkered", ("checks", "a checkerboard")),
    "dots": ("dotted", ("dots", "polka dots")),
    "grid": ("grid", ("a grid", "grid lines")),
    "waves": ("wavy", ("waves", "wavy lines")),
    "rings": ("rippled", ("ripples", "concentric ripples")),
    "zigzag": ("zigzag", ("zigzags", "a zigzag")),
    "speckles": ("speckled", ("speckles", "specks")),
}
_COUNT_WORDS = ("one", "two", "three", "four")

# The object identities of single-object scenes: what the control task classifies.
CONCEPTS: tuple[str, ...] = (
    *(f"digit {d}" for d in DIGITS),
    *(f"letter {c}" for c in LATIN),
    *(f"greek letter {n}" for _, n in R.GREEK),
    *R.SHAPES,
)


@dataclasses.dataclass(frozen=True)
class CorpusExample:
    """One image–caption pair and what was drawn.

    Attributes:
      image: uint8 ``[32, 32, 3]``.
      caption: the caption (lower case, ASCII).
      kind: ``"glyph"``, ``"shape"``, ``"texture"`` or ``"multi"``.
      concept: index into :data:`CONCEPTS` for single-object scenes, else -1.
      attributes: what was drawn (colour names, position, size, font, ...).
    """

    image: np.ndarray
    caption: str
    kind: str
    concept: int
    attributes: dict


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrasting(rng: np.random.Generator, other: str, min_diff: float = 70.0) -> str:
    names = [n for n in R.COLOURS if n != other]
    good = [
        n for n in names if abs(_luminance(R.COLOURS[n]) - _luminance(R.COLOURS[other])) >= min_diff
    ]
    return _pick(rng, good or names)


def _position_word(cx: float, cy: float, size: int) -> str:
    third = size / 3.0
    return _POSITIONS[(min(int(cx // third), 2), min(int(cy // third), 2))]


def _size_word(value: float, small: float, large: float) -> str | None:
    if value <= small:
        return "small"
    if value >= large:
        return "large"
    return None


def _background(
    rng: np.random.Generator, fg: str, size: int
) -> tuple[np.ndarray, str | None, dict]:
    """A plain (75 %) or muted textured background; returns the image, its caption phrase, attrs."""
    bg = _contrasting(rng, fg)
    base = R.colour(bg, rng)
    if rng.random() < 0.75:
        img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
        return img, f"on a {bg} background", {"background": bg}
    kind = _pick(rng, R.TEXTURES)
    m = R.texture(kind, size=size, period=rng.uniform(4, 10), angle=rng.uniform(0, 180), rng=rng)
    other = base * 0.6 + 0.4 * np.asarray(R.COLOURS["gray"], np.float32)
    img = R.two_tone(m, base, other)
    return img, f"on a {TEXTURE_WORDS[kind][0]} background", {"background": kind}


def _glyph_name(rng: np.random.Generator, category: str, char: str, greek_name: str) -> str:
    if category == "digit":
        word = R.DIGIT_NAMES[int(char)]
        forms = (
            f"the number {char}",
            f'the number "{char}"',
            f'the number: "{char}"',
            f"the digit {char}",
            f"the digit {word}",
            f"a {char}",
            f"number {word}",
            word,
            char,
        )
    elif category == "greek":
        forms = (
            f"the greek letter {greek_name}",
            f"greek {greek_name}",
            greek_name,
            f"a {greek_name}",
        )
    elif category == "upper":
        forms = (f"the capital letter {char}", f"a capital {char}", f"uppercase {char}")
    else:
        forms = (f"the letter {char}", f"a lowercase {char}", f"letter {char}", char)
    return _pick(rng, forms)


def _phrase(
    rng: np.random.Generator, core: str, extras: list[str | None], prefix: bool = True
) -> str:
    parts = [e for e in extras if e and rng.random() < 0.5]
    rng.shuffle(parts)
    text = " ".join([core, *parts])
    if prefix and rng.random() < 0.3:
        text = f"{_pick(rng, _PREFIXES)} {text}"
    return text


def _glyph_scene(rng: np.random.Generator, size: int) -> CorpusExample:
    u = rng.random()
    category = "digit" if u < 0.35 else "lower" if u < 0.7 else "greek" if u < 0.9 else "upper"
    greek_name = ""
    if category == "digit":
        char = _pick(rng, DIGITS)
        concept = CONCEPTS.index(f"digit {char}")
    elif category == "greek":
        char, greek_name = _pick(rng, R.GREEK)
        concept = CONCEPTS.index(f"greek letter {greek_name}")
    else:
        char = _pick(rng, LATIN)
        concept = CONCEPTS.index(f"letter {char}")
        if category == "upper":
            char, concept = char.upper(), -1
    fonts = [f for f in R.PRETRAIN_FONTS if not (category == "greek" and f in R.LATIN_ONLY)]
    font = _pick(rng, fonts)
    height = rng.uniform(14, 28)
    margin = max(6.0, height * 0.45)
    cx, cy = rng.uniform(margin, size - margin, 2)
    fg = _pick(rng, tuple(R.COLOURS))
    bg_img, bg_words, bg_attrs = _background(rng, fg, size)
    mask = R.glyph_mask(
        char, font, size=size, height=height, centre=(cx, cy), angle=rng.uniform(-15, 15)
    )
    img = R.composite(bg_img, mask, R.colour(fg, rng))
    size_word = _size_word(height, 17, 24)
    name = _glyph_name(rng, category, char.lower(), greek_name)
    colour_first = rng.random() < 0.5
    core = name
    if colour_first and name.startswith(("the ", "a ")):
        art, rest = name.split(" ", 1)
        adj = " ".join(w for w in (size_word if rng.random() < 0.5 else None, fg) if w)
        core = f"{art} {adj} {rest}"
        extras = [_position_word(cx, cy, size), bg_words]
    else:
        extras = [f"in {fg}", _position_word(cx, cy, size), bg_words]
    caption = _phrase(rng, core, extras)
    attrs = {"char": char, "font": font, "colour": fg, "category": category, **bg_attrs}
    return CorpusExample(img, caption, "glyph", concept, attrs)


def _plural(shape: str) -> str:
    return shape + ("es" if shape == "cross" else "s")


def _shape_scene(rng: np.random.Generator, size: int) -> CorpusExample:
    shape = _pick(rng, R.SHAPES)
    radius = rng.uniform(5, 13)
    cx, cy = rng.uniform(radius + 1, size - radius - 1, 2)
    outline = int(rng.integers(2, 5)) if rng.random() < 0.3 and shape != "ring" else 0
    fg = _pick(rng, tuple(R.COLOURS))
    bg_img, bg_words, bg_attrs = _background(rng, fg, size)
    angle = rng.uniform(-20, 20)
    mask = R.shape_mask(
        shape, size=size, radius=radius, centre=(cx, cy), angle=angle, outline=outline
    )
    img = R.composite(bg_img, mask, R.colour(fg, rng))
    adjs = [w for w in (_size_word(radius, 7, 11), fg if rng.random() < 0.7 else None) if w]
    if outline:
        adjs.append(_pick(rng, ("outlined", "hollow")))
    core = " ".join(["a", *adjs, shape])
    caption = _phrase(rng, core, [_position_word(cx, cy, size), bg_words])
    attrs = {"shape": shape, "colour": fg, "outline": bool(outline), **bg_attrs}
    return CorpusExample(img, caption, "shape", CONCEPTS.index(shape), attrs)


def _texture_scene(rng: np.random.Generator, size: int) -> CorpusExample:
    kind = _pick(rng, R.TEXTURES)
    c1 = _pick(rng, tuple(R.COLOURS))
    c2 = _contrasting(rng, c1)
    m = R.texture(kind, size=size, period=rng.uniform(4, 10), angle=rng.uniform(0, 180), rng=rng)
    img = R.two_tone(m, R.colour(c1, rng), R.colour(c2, rng))
    adj, nouns = TEXTURE_WORDS[kind]
    forms = (
        f"a {adj} pattern",
        f"a {c1} and {c2} {adj} pattern",
        f"a {adj} texture",
        f"{c1} {_pick(rng, nouns)}",
        _pick(rng, nouns),
        f"{_pick(rng, nouns)} in {c1} and {c2}",
    )
    caption = _phrase(rng, _pick(rng, forms), [])
    return CorpusExample(img, caption, "texture", -1, {"texture": kind, "colours": (c1, c2)})


def _multi_scene(rng: np.random.Generator, size: int) -> CorpusExample:
    shape = _pick(rng, R.SHAPES)
    count = int(rng.integers(2, 5))
    fg = _pick(rng, tuple(R.COLOURS))
    bg_img, bg_words, bg_attrs = _background(rng, fg, size)
    radius = rng.uniform(3.5, 5.5)
    centres: list[tuple[float, float]] = []
    tries = 0
    while len(centres) < count:  # rejection sampling of non-overlapping centres
        tries += 1
        if tries % 50 == 0:  # a crowded layout: start it over, a little smaller
            centres, radius = [], max(2.5, radius * 0.9)
        c = tuple(rng.uniform(radius + 1, size - radius - 1, 2))
        if all(np.hypot(c[0] - a, c[1] - b) > 2 * radius + 1 for a, b in centres):
            centres.append(c)
    mask = np.zeros((size, size), np.float32)
    for c in centres:
        mask = np.maximum(mask, R.shape_mask(shape, size=size, radius=radius, centre=c))
    img = R.composite(bg_img, mask, R.colour(fg, rng))
    colour_word = fg if rng.random() < 0.7 else None
    core = " ".join(w for w in (_COUNT_WORDS[count - 1], colour_word, _plural(shape)) if w)
    caption = _phrase(rng, core, [bg_words])
    attrs = {"shape": shape, "count": count, "colour": fg, **bg_attrs}
    return CorpusExample(img, caption, "multi", -1, attrs)


def corpus_example(seed: int, index: int, *, image_size: int = IMAGE_SIZE) -> CorpusExample:
    """Example ``index`` of the corpus of ``seed`` (a pure function of both).

    Raises:
      ValueError: if ``seed`` or ``index`` is negative.
    """
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"{seed=} and {index=} must be non-negative")
    rng = np.random.default_rng([int(seed), int(index)])
    u = rng.random()
    if u < 0.5:
        ex = _glyph_scene(rng, image_size)
    elif u < 0.75:
        ex = _shape_scene(rng, image_size)
    elif u < 0.87:
        ex = _texture_scene(rng, image_size)
    else:
        ex = _multi_scene(rng, image_size)
    img = ex.image + rng.normal(0.0, rng.uniform(0.0, 8.0), ex.image.shape)
    caption = _AN.sub("an ", ex.caption)
    return dataclasses.replace(ex, image=R.to_uint8(img), caption=caption)


def corpus_batch(
    seed: int, start: int, count: int, *, image_size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Examples ``start .. start+count-1``: images uint8 ``[count, S, S, 3]``, captions, concepts."""
    if int(count) < 0:
        raise ValueError(f"{count=} must be non-negative")
    exs = [corpus_example(seed, i, image_size=image_size) for i in range(start, start + count)]
    images = (
        np.stack([e.image for e in exs])
        if exs
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return images, [e.caption for e in exs], np.asarray([e.concept for e in exs], np.int32)


def caption_words() -> list[str]:
    """Every word the caption templates can produce (the tokenizer's training vocabulary)."""
    words = set(
        "a an the of on in at and number digit letter greek capital lowercase uppercase".split()
    )
    words |= {w for p in _PREFIXES for w in p.split()}
    words |= {w for p in _POSITIONS.values() for w in p.split()}
    words |= set(R.COLOURS) | set(R.DIGIT_NAMES) | set(DIGITS) | set(LATIN)
    words |= {n for _, n in R.GREEK} | set(R.SHAPES) | {_plural(s) for s in R.SHAPES}
    words |= {"small", "large", "outlined", "hollow", "background", "pattern", "texture"}
    words |= set(_COUNT_WORDS)
    for adj, nouns in TEXTURE_WORDS.values():
        words.add(adj)
        words |= {w for n in nouns for w in n.split()}
    return sorted(words)
