import math

import numpy as np
import pytest

from cljax.data import (
    ATTRIBUTE_COLOURS,
    ATTRIBUTE_STYLES,
    GlyphAttributeImages,
    MultiDigitImages,
    generate_glyph_attributes,
    generate_multi_shapes,
)
from cljax.data import _render as R


def test_multi_shapes_shapes_and_layout():
    """Each image is the max of the up-left and down-right objects, labelled by their class."""
    left, right = generate_multi_shapes(40, 10, 12, objects_per_class=10, seed=1)
    assert left.x_train is right.x_train and isinstance(left.x_train, MultiDigitImages)
    assert left.x_train.shape == (40, 36, 36, 1) and left.x_test.shape == (12, 36, 36, 1)
    assert left.classes == R.SHAPES and right.num_classes == 10
    x = left.x_train
    imgs = np.asarray(x)[..., 0]
    assert imgs.dtype == np.float32 and 0 <= imgs.min() and imgs.max() <= 1
    for n in range(40):
        r, c, r2, c2 = (int(v) for v in x.shifts[n])
        canvas = np.zeros((36, 36), np.float32)
        canvas[r : r + 28, c : c + 28] = x.pool[x.left[n]]
        assert max(r, c, r2, c2) <= 2  # the default max_shift=2, Multi-MNIST's layout
        box = canvas[6 + r2 : 34 + r2, 6 + c2 : 34 + c2]  # 36 - 28 - max_shift
        canvas[6 + r2 : 34 + r2, 6 + c2 : 34 + c2] = np.maximum(box, x.pool[x.right[n]])
        np.testing.assert_array_equal(imgs[n], canvas)
        assert left.y_train[n] == x.pool_labels[x.left[n]]
        assert right.y_train[n] == x.pool_labels[x.right[n]]
    assert x.shifts.max() == 2 and x.shifts.min() == 0
    # the pool holds 7 training renderings of each of the ten shapes, all non-empty
    assert np.array_equal(np.bincount(x.pool_labels), np.full(10, 7))
    assert np.all(x.pool.reshape(70, -1).max(1) > 0.2)


def test_multi_shapes_objects_follow_their_class():
    """A pool object is its class's shape: among reference masks of every class (a few sizes,
    squashes, tilts and one-pixel offsets), its best match is of its own class (hexagons and
    circles may swap: allow a tenth)."""
    left, _ = generate_multi_shapes(5, 5, 5, objects_per_class=10, seed=0)
    pool, labels = left.x_train.pool, left.x_train.pool_labels
    refs = np.stack(
        [
            [
                R.shape_mask(s, size=28, radius=r, centre=(14.0, 14.0), angle=a, squash=q) > 0.5
                for r in (9.5, 11.5)
                for q in (0.8, 1.0)
                for a in (-10, 0, 10)
            ]
            for s in R.SHAPES
        ]
    ).astype(np.float32)
    shifted = [np.roll(refs, (dy, dx), axis=(2, 3)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    refs = np.stack(shifted, 2).reshape(10, -1, 28, 28)
    m = (pool > 0.1).astype(np.float32)
    inter = np.einsum("nhw,krhw->nkr", m, refs)
    union = m.sum((1, 2))[:, None, None] + refs.sum((2, 3))[None] - inter
    best = (inter / union).max(2).argmax(1)
    assert np.mean(best == labels) >= 0.9


def test_multi_shapes_deterministic_and_split_disjoint():
    a, ar = generate_multi_shapes(30, 5, 6, objects_per_class=10, seed=2)
    b, br = generate_multi_shapes(30, 5, 6, objects_per_class=10, seed=2)
    c, _ = generate_multi_shapes(30, 5, 6, objects_per_class=10, seed=3)
    np.testing.assert_array_equal(np.asarray(a.x_train), np.asarray(b.x_train))
    np.testing.assert_array_equal(ar.y_test, br.y_test)
    assert not np.array_equal(np.asarray(a.x_train), np.asarray(c.x_train))
    d, _ = generate_multi_shapes(30, 5, 7, objects_per_class=10, seed=2)
    np.testing.assert_array_equal(np.asarray(d.x_train), np.asarray(a.x_train))
    train = {p.tobytes() for p in a.x_train.pool}
    assert not any(p.tobytes() in train for p in a.x_test.pool)
    assert not any(p.tobytes() in train for p in a.x_val.pool)


def test_multi_shapes_validates():
    with pytest.raises(ValueError, match="objects_per_class=5"):
        generate_multi_shapes(10, 10, 10, objects_per_class=5)
    with pytest.raises(ValueError, match="num_val=0"):
        generate_multi_shapes(10, 0, 10, objects_per_class=10)
    with pytest.raises(ValueError, match="size=29"):  # 28 + the default max_shift=2 does not fit
        generate_multi_shapes(10, 10, 10, size=29, objects_per_class=10)
    with pytest.raises(ValueError, match="size=30"):
        generate_multi_shapes(10, 10, 10, size=30, max_shift=4, objects_per_class=10)


def _reference_image(x, n):
    """Image ``n`` of ``x`` painted pixel by pixel from its recorded draws."""
    g, style = int(x.glyph[n]), int(x.style[n])
    period, angle, phase = (float(v) for v in x.pattern[n])
    a = math.radians(angle)
    out = np.zeros((32, 32, 3), np.float32)
    for i in range(32):
        for j in range(32):
            m = float(x.hollow[g][i, j] if style == 1 else x.solid[g][i, j])
            u = (j + 0.5) * math.cos(a) + (i + 0.5) * math.sin(a) + phase
            v = -(j + 0.5) * math.sin(a) + (i + 0.5) * math.cos(a) + phase
            if style == 2:
                m *= float(u % period < period / 2)
            elif style == 3:
                m *= float((math.floor(2 * u / period) + math.floor(2 * v / period)) % 2 == 0)
            out[i, j] = x.background[n] * (1 - m) + x.colour_rgb[n] * m
    return out


def test_glyph_attributes_shapes_and_labels():
    content, colour, style = generate_glyph_attributes(60, 8, 10, glyphs_per_class=10, seed=0)
    x = content.x_train
    assert isinstance(x, GlyphAttributeImages) and colour.x_train is x
    assert style.x_val is content.x_val and style.x_test is colour.x_test
    assert x.shape == (60, 32, 32, 3) and content.x_test.shape == (10, 32, 32, 3)
    assert (content.num_classes, colour.num_classes, style.num_classes) == (10, 6, 4)
    assert colour.classes == ATTRIBUTE_COLOURS and style.classes == ATTRIBUTE_STYLES
    full = np.asarray(x)
    assert full.dtype == np.float32 and 0 <= full.min() and full.max() <= 1
    np.testing.assert_array_equal(x[7], full[7])
    np.testing.assert_array_equal(x[np.array([3, 1, 3])], full[[3, 1, 3]])
    for n in np.flatnonzero(np.diff(x.style, prepend=-1))[:6]:  # a run of each style
        np.testing.assert_allclose(full[n], _reference_image(x, n), atol=1e-5)
    # content: the pool's digits come in blocks of 7 training renderings per digit
    np.testing.assert_array_equal(content.y_train, x.glyph // 7)
    # colour: the painted colour is the named colour of the label, up to a small jitter
    base = np.asarray([R.COLOURS[c] for c in ATTRIBUTE_COLOURS]) / 255
    assert np.abs(x.colour_rgb - base[colour.y_train]).max() < 0.25
    np.testing.assert_array_equal(
        np.abs(x.colour_rgb[:, None] - base[None]).sum(-1).argmin(1), colour.y_train
    )
    # style: the share of the solid glyph's inside painted in the label's colour is 1 for
    # solid glyphs, and on average lower for outlines and about half for the two patterns
    frac = np.array(
        [
            (np.abs(full[n][inside] - x.colour_rgb[n]).max(1) < 0.011).mean()
            for n, inside in enumerate(x.solid[x.glyph] >= 0.99)
        ]
    )
    assert np.all(frac[style.y_train == 0] == 1.0)
    assert np.nanmean(frac[style.y_train == 1]) < 0.6
    assert 0.25 < np.nanmean(frac[style.y_train >= 2]) < 0.75
    assert set(style.y_train) == {0, 1, 2, 3} and len(set(colour.y_train)) == 6


def test_glyph_attributes_deterministic_and_validated():
    a = generate_glyph_attributes(20, 5, 5, glyphs_per_class=10, seed=0)
    b = generate_glyph_attributes(20, 5, 5, glyphs_per_class=10, seed=0)
    c = generate_glyph_attributes(20, 5, 5, glyphs_per_class=10, seed=1)
    np.testing.assert_array_equal(np.asarray(a[0].x_train), np.asarray(b[0].x_train))
    for ta, tb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ta.y_train, tb.y_train)
    assert not np.array_equal(np.asarray(a[0].x_train), np.asarray(c[0].x_train))
    train = {p.tobytes() for p in a[0].x_train.solid}
    assert not any(p.tobytes() in train for p in a[0].x_test.solid)
    with pytest.raises(ValueError, match="glyphs_per_class=3"):
        generate_glyph_attributes(10, 10, 10, glyphs_per_class=3)
    with pytest.raises(ValueError, match="num_train=0"):
        generate_glyph_attributes(0, 10, 10, glyphs_per_class=10)
