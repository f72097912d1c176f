"""The embedded 8-task benchmark: MiniCLIP's analogue of CLIP's 8-task merging benchmark.

Eight classification tasks, each standing where one data set of the task-arithmetic
benchmark (Ilharco et al., 2023) stands: a distinct domain and label set, zero-shot far from
fine-tuned. Two use real handwriting that ships inside PyPI packages (MNIST-5k, scikit-learn's
digits); six are procedural and drawn *outside* the pretraining distribution of
:mod:`cljax.data._corpus`: held-out fonts (slanted, bold monospace, Computer Modern bold,
italic and typewriter), held-out styles (hollow, texture-filled and shadowed glyphs, warped
textures, texture-filled shapes among clutter, signs, house-number strips) and blotchy
backgrounds the corpus never draws.

| task     | stands for | classes | content                                                 |
|----------|------------|---------|---------------------------------------------------------|
| greek    | Cars       | 24      | Greek letters in held-out fonts and styles (fine-grained)|
| textures | DTD        | 8       | warped, noisy two-tone textures                          |
| digits   | EuroSAT    | 10      | scikit-learn's 8×8 handwritten digits, upscaled (low-res)|
| signs    | GTSRB      | 16      | sign shapes × colours with a symbol, blurred, squashed   |
| mnist    | MNIST      | 10      | MNIST-5k handwritten digits                              |
| letters  | RESISC45   | 26      | Latin letters in held-out fonts and styles               |
| shapes   | SUN397     | 10      | texture-filled shapes among glyph clutter                |
| svhn     | SVHN       | 10      | the centre digit of a house-number strip                 |

The **control** task (the role ImageNet plays for task negation and as ZSCL's reference
set) is drawn *from* the pretraining distribution: single glyphs and shapes rendered exactly
as the corpus renders them (70 classes), from a seed the pretraining run never used.

Images are uint8 ``[N, 32, 32, 3]`` (normalise them as the model's preprocessor does). Each
task carries the class names and prompt templates of its zero-shot head.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np

from cljax.data import _render as R
from cljax.data._corpus import CONCEPTS, LATIN, corpus_example
from cljax.data._sources import load_digits, load_mnist5k
from cljax.data._task import Task

__all__ = [
    "EMBEDDED_TASKS",
    "EmbeddedBenchmark",
    "embedded_benchmark",
]

EMBEDDED_TASKS = ("greek", "textures", "digits", "signs", "mnist", "letters", "shapes", "svhn")
SIZE = 32
# Prompts in the corpus' own phrasing (its captions carry no final full stop; CLIP's
# templates end with one because web alt-text does).
_DIGIT_TEMPLATES = ('a photo of the number: "{}"', "a photo of the number {}", "the digit {}")
TEMPLATES: dict[str, tuple[str, ...]] = {
    "greek": ("a photo of the greek letter {}", "the greek letter {}", "a picture of {}"),
    "textures": ("a photo of a {} texture", "a photo of a {} pattern", "a {} pattern"),
    "digits": _DIGIT_TEMPLATES,
    "signs": ("a photo of a {}", "a picture of a {}", "a {}"),
    "mnist": _DIGIT_TEMPLATES,
    "letters": ("a photo of the letter {}", "the letter {}", "a picture of a lowercase {}"),
    "shapes": ("a photo of a {}", "a picture of a {}", "a drawing of a {}"),
    "svhn": _DIGIT_TEMPLATES,
    "control": ("{}", "a photo of {}", "an image of {}"),
}
_SIGN_SHAPES = ("circle", "triangle", "square", "diamond")
_SIGN_COLOURS = ("red", "blue", "yellow", "green")
_TEXTURE_CLASSES = {
    "stripes": "striped",
    "checks": "checkered",
    "dots": "dotted",
    "grid": "grid",
    "waves": "wavy",
    "rings": "rippled",
    "zigzag": "zigzag",
    "speckles": "speckled",
}
_GREEK_FONTS = tuple(f for f in R.HELDOUT_FONTS if f not in R.LATIN_ONLY)


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddedBenchmark:
    """The 8 target tasks, the control task and their zero-shot prompt templates.

    Attributes:
      tasks: the 8 :class:`Task` objects in :data:`EMBEDDED_TASKS` order (or the subset asked for).
      control: the control task from the pretraining distribution.
      templates: ``{task name: templates}`` for the zero-shot heads (``"control"`` included).
    """

    tasks: tuple[Task, ...]
    control: Task
    templates: dict[str, tuple[str, ...]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> Task:
        if name == "control":
            return self.control
        if name not in self.names:
            raise ValueError(f"unknown task {name!r}; the benchmark has {self.names} and 'control'")
        return self.tasks[self.names.index(name)]


# ------------------------------------------------------------------------------ drawing


def _blotches(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, cells: int = 5) -> np.ndarray:
    """A smooth random blend of colours ``a`` and ``b`` (a background the corpus never draws)."""
    from PIL import Image

    low = rng.random((cells, cells)).astype(np.float32)
    t = np.asarray(Image.fromarray(low, mode="F").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    t = np.clip(t, 0, 1)[..., None]
    return a * t + b * (1 - t)


def _any_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _contrast_colour(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
    for _ in range(20):
        c = _any_colour(rng)
        if abs(c @ [0.299, 0.587, 0.114] - bg.mean(axis=(0, 1)) @ [0.299, 0.587, 0.114]) > 80:
            return c
    return 255.0 - bg.mean(axis=(0, 1))


def _blur(img: np.ndarray, rng: np.random.Generator, max_radius: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    r = rng.uniform(0, max_radius)
    if r < 0.2:
        return img
    pil = Image.fromarray(R.to_uint8(img)).filter(ImageFilter.GaussianBlur(r))
    return np.asarray(pil, np.float32)


def _finish(img: np.ndarray, rng: np.random.Generator, noise: tuple[float, float]) -> np.ndarray:
    return R.to_uint8(img + rng.normal(0, rng.uniform(*noise), img.shape))


def _styled_glyph(rng: np.random.Generator, char: str, fonts: tuple[str, ...]) -> np.ndarray:
    """A glyph in a held-out font and style (hollow, texture-filled or shadowed) on blotches."""
    bg = _blotches(rng, _any_colour(rng), _any_colour(rng))
    fg = _contrast_colour(rng, bg)
    font = fonts[int(rng.integers(len(fonts)))]
    height = rng.uniform(18, 28)
    centre = (SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3))
    angle = rng.uniform(-20, 20)
    style = int(rng.integers(3))
    if style == 0:  # hollow
        mask = R.glyph_mask(
            char, font, size=SIZE, height=height, centre=centre, angle=angle, outline=3
        )
        img = R.composite(bg, mask, fg)
    elif style == 1:  # filled with a texture of two colours
        mask = R.glyph_mask(char, font, size=SIZE, height=height, centre=centre, angle=angle)
        kind = R.TEXTURES[int(rng.integers(len(R.TEXTURES)))]
        tex = R.texture(
            kind, size=SIZE, period=rng.uniform(3, 5), angle=rng.uniform(0, 180), rng=rng
        )
        fill = R.two_tone(tex, fg, fg * 0.45)
        img = R.composite(bg, mask, fill)
    else:  # a dark offset shadow behind the glyph
        kw = dict(size=SIZE, height=height, angle=angle)
        shadow = R.glyph_mask(char, font, centre=(centre[0] + 2, centre[1] + 2), **kw)
        img = R.composite(bg, shadow, bg.mean(axis=(0, 1)) * 0.25)
        img = R.composite(img, R.glyph_mask(char, font, centre=centre, **kw), fg)
    return _finish(img, rng, (2, 10))


def _draw_greek(rng, label):
    return _styled_glyph(rng, R.GREEK[label][0], _GREEK_FONTS)


def _draw_letters(rng, label):
    return _styled_glyph(rng, LATIN[label], R.HELDOUT_FONTS)


def _draw_textures(rng, label):
    kind = tuple(_TEXTURE_CLASSES)[label]
    m = R.texture(
        kind,
        size=SIZE,
        period=rng.uniform(5, 11),
        angle=rng.uniform(0, 180),
        rng=rng,
        warp=rng.uniform(1.0, 2.5),
    )
    a, b = _any_colour(rng), _any_colour(rng)
    if abs((a - b) @ [0.299, 0.587, 0.114]) < 50:  # keep the pattern visible
        b = 255.0 - a
    img = R.two_tone(m, a, b)
    shade = _blotches(rng, np.ones(3, np.float32), np.full(3, 0.6, np.float32), cells=3)
    return _finish(_blur(img * shade, rng, 0.8), rng, (4, 14))


def _draw_shapes(rng, label):
    shape = R.SHAPES[label]
    bg = _blotches(rng, _any_colour(rng), _any_colour(rng))
    for _ in range(int(rng.integers(2, 4))):  # small glyph clutter
        c = (rng.uniform(3, SIZE - 3), rng.uniform(3, SIZE - 3))
        ch = LATIN[int(rng.integers(26))]
        font = R.HELDOUT_FONTS[int(rng.integers(len(R.HELDOUT_FONTS)))]
        m = R.glyph_mask(ch, font, size=SIZE, height=rng.uniform(7, 10), centre=c)
        bg = R.composite(bg, m, _any_colour(rng))
    fg = _contrast_colour(rng, bg)
    radius = rng.uniform(8, 13)
    centre = (SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3))
    mask = R.shape_mask(
        shape,
        size=SIZE,
        radius=radius,
        centre=centre,
        angle=rng.uniform(-40, 40),
        squash=rng.uniform(0.75, 1.0),
    )
    kind = R.TEXTURES[int(rng.integers(len(R.TEXTURES)))]
    tex = R.texture(kind, size=SIZE, period=rng.uniform(3, 6), angle=rng.uniform(0, 180), rng=rng)
    img = R.composite(bg, mask, R.two_tone(tex, fg, fg * 0.5))
    return _finish(img, rng, (2, 10))


def _draw_signs(rng, label):
    shape, colour = _SIGN_SHAPES[label // 4], _SIGN_COLOURS[label % 4]
    bg = _blotches(rng, rng.uniform(60, 200, 3), rng.uniform(60, 200, 3), cells=4)
    radius = rng.uniform(8, 14)
    centre = (SIZE / 2 + rng.uniform(-4, 4), SIZE / 2 + rng.uniform(-4, 4))
    kw = dict(size=SIZE, centre=centre, angle=rng.uniform(-10, 10), squash=rng.uniform(0.7, 1.0))
    border = R.shape_mask(shape, radius=radius, **kw)
    inner = R.shape_mask(shape, radius=radius * 0.78, **kw)
    img = R.composite(bg, border, np.full(3, 240.0))  # a white rim
    img = R.composite(img, inner, R.colour(colour, rng, jitter=25))
    sym = str(int(rng.integers(10))) if rng.random() < 0.5 else LATIN[int(rng.integers(26))]
    font = R.HELDOUT_FONTS[int(rng.integers(len(R.HELDOUT_FONTS)))]
    m = R.glyph_mask(sym, font, size=SIZE, height=radius * 0.9, centre=centre)
    img = R.composite(
        img, m, np.full(3, 240.0) if colour in ("red", "blue", "green") else np.full(3, 20.0)
    )
    img = img * rng.uniform(0.55, 1.15)  # lighting
    return _finish(_blur(img, rng, 1.0), rng, (2, 10))


def _draw_svhn(rng, label):
    bg = _blotches(rng, _any_colour(rng), _any_colour(rng), cells=3)
    fg = _contrast_colour(rng, bg)
    font = R.HELDOUT_FONTS[int(rng.integers(len(R.HELDOUT_FONTS)))]
    height = rng.uniform(20, 28)
    step = height * rng.uniform(0.55, 0.7)
    cx = SIZE / 2 + rng.uniform(-1.5, 1.5)
    cy = SIZE / 2 + rng.uniform(-2, 2)
    img = bg
    for offset in (-2, -1, 0, 1, 2):  # neighbours on both sides, cut by the frame
        if offset and rng.random() < 0.3:
            continue
        d = label if offset == 0 else int(rng.integers(10))
        m = R.glyph_mask(str(d), font, size=SIZE, height=height, centre=(cx + offset * step, cy))
        img = R.composite(img, m, fg)
    return _finish(_blur(img, rng, 0.9), rng, (3, 12))


_DRAW = {
    "greek": _draw_greek,
    "textures": _draw_textures,
    "signs": _draw_signs,
    "letters": _draw_letters,
    "shapes": _draw_shapes,
    "svhn": _draw_svhn,
}
CLASSNAMES: dict[str, tuple[str, ...]] = {
    "greek": tuple(n for _, n in R.GREEK),
    "textures": tuple(_TEXTURE_CLASSES.values()),
    "digits": tuple("0123456789"),
    "signs": tuple(f"{c} {s}" for s in _SIGN_SHAPES for c in _SIGN_COLOURS),
    "mnist": tuple("0123456789"),
    "letters": LATIN,
    "shapes": R.SHAPES,
    "svhn": tuple("0123456789"),
    "control": tuple(
        f"the {c}" if c.startswith(("digit", "letter", "greek")) else f"a {c}" for c in CONCEPTS
    ),
}


def _procedural(name: str, seed: int, n: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    draw = _DRAW[name]
    k = len(CLASSNAMES[name])
    x = np.empty((n, SIZE, SIZE, 3), np.uint8)
    y = np.empty((n,), np.int32)
    for i in range(n):
        rng = np.random.default_rng([seed, EMBEDDED_TASKS.index(name), split_id, i])
        y[i] = i % k  # balanced classes, order shuffled below
        x[i] = draw(rng, int(y[i]))
    perm = np.random.default_rng([seed, 99, split_id]).permutation(n)
    return x[perm], y[perm]


def _control(seed: int, n: int, split_id: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys, i = [], [], 0
    while len(ys) < n:  # single-object scenes of the corpus, from a seed pretraining never uses
        ex = corpus_example(1_000_003 + 10 * seed + split_id, i)
        i += 1
        if ex.concept >= 0:
            xs.append(ex.image)
            ys.append(ex.concept)
    return np.stack(xs), np.asarray(ys, np.int32)


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(R.to_uint8(x * 255.0)[..., None], 3, axis=-1)


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_mnist5k()
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))  # 28 -> 32, the digit centred as in MNIST
    return _gray_to_rgb(x), y


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    x, y = load_digits()
    up = [
        np.asarray(Image.fromarray(im, mode="F").resize((24, 24), Image.Resampling.BILINEAR))
        for im in x
    ]
    x = np.pad(np.clip(np.stack(up), 0, 1), ((0, 0), (4, 4), (4, 4)))
    return _gray_to_rgb(x), y


def _split_real(
    x: np.ndarray, y: np.ndarray, seed: int, sizes: tuple[int, int, int]
) -> tuple[np.ndarray, ...]:
    perm = np.random.default_rng([seed, 5]).permutation(len(y))  # the files are sorted by label
    n_train, n_val, n_test = sizes
    if n_train + n_val + n_test > len(y):
        raise ValueError(f"asked for {sizes} examples, only {len(y)} exist")
    a, b = n_train, n_train + n_val
    idx = perm[:a], perm[a:b], perm[b : b + n_test]
    return tuple(v for i in idx for v in (x[i], y[i]))


def _build(name: str, seed: int, train: int, val: int, test: int) -> Task:
    if name == "mnist":
        arrays = _split_real(*_mnist(), seed, (min(train, 3500), val, min(test, 1000)))
    elif name == "digits":
        arrays = _split_real(*_digits(), seed, (min(train, 1797 - val - 400), val, min(test, 400)))
    elif name == "control":
        arrays = (*_control(seed, train, 0), *_control(seed, val, 1), *_control(seed, test, 2))
    else:
        arrays = (
            *_procedural(name, seed, train, 0),
            *_procedural(name, seed, val, 1),
            *_procedural(name, seed, test, 2),
        )
    return Task(name, CLASSNAMES[name], *arrays)


def _cached(name: str, seed: int, sizes: tuple[int, int, int], cache_dir: Path | None) -> Task:
    if cache_dir is None:
        return _build(name, seed, *sizes)
    blob = json.dumps([name, seed, sizes, _VERSION])
    path = cache_dir / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.npz"
    keys = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    if path.is_file():
        try:
            with np.load(path) as f:
                return Task(name, CLASSNAMES[name], *(f[k] for k in keys))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file is rebuilt below
    task = _build(name, seed, *sizes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A name of this writer's own: processes that build the same file at once (the workers
    # of one run) must not write into one temporary file.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part.npz")
    np.savez(tmp, **{k: getattr(task, k) for k in keys})
    os.replace(tmp, path)
    return task


_VERSION = 1  # bump when the drawing changes, so caches are rebuilt


def _cached_job(args) -> Task:
    return _cached(*args)


@functools.lru_cache(maxsize=4)
def _benchmark(seed, tasks, sizes, cache_dir, workers) -> EmbeddedBenchmark:
    cache = Path(cache_dir) if cache_dir else None
    jobs = [(n, seed, sizes, cache) for n in (*tasks, "control")]
    if workers > 1:  # each task is a pure function of its arguments: same bytes in any process
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            built = pool.map(_cached_job, jobs, chunksize=1)
    else:
        built = [_cached_job(j) for j in jobs]
    return EmbeddedBenchmark(
        tuple(built[:-1]), built[-1], {k: TEMPLATES[k] for k in (*tasks, "control")}
    )


def embedded_benchmark(
    seed: int = 0,
    *,
    tasks: tuple[str, ...] = EMBEDDED_TASKS,
    train_size: int = 2000,
    val_size: int = 200,
    test_size: int = 500,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
) -> EmbeddedBenchmark:
    """The embedded 8-task benchmark and its control task.

    Args:
      seed: draws the procedural images and the splits of the real ones.
      tasks: which of :data:`EMBEDDED_TASKS` to build, in this order.
      train_size, val_size, test_size: examples per split (the real tasks are capped by
        their data: MNIST-5k gives at most 3,500/…/1,000, scikit-learn's digits
        1,797 − val − 400 / val / 400).
      cache_dir: if given, built tasks are stored there and read back on later calls.
      workers: processes that draw the tasks in parallel (``spawn`` start method: a script
        that asks for more than 1 needs the ``if __name__ == "__main__":`` guard). The
        images do not depend on it.

    Returns:
      An :class:`EmbeddedBenchmark`; images are uint8 ``[N, 32, 32, 3]``.

    Raises:
      ValueError: for an unknown task or a non-positive size.
    """
    unknown = [t for t in tasks if t not in EMBEDDED_TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks={tasks!r}: each must be one of {EMBEDDED_TASKS}")
    for name, v in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer")
    key = None if cache_dir is None else str(Path(cache_dir).absolute())
    sizes = (int(train_size), int(val_size), int(test_size))
    return _benchmark(int(seed), tuple(tasks), sizes, key, int(workers))
