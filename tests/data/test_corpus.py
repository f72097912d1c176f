"""The procedural pretraining corpus: deterministic, and its captions say what is drawn."""

import re

import numpy as np
import pytest

from cljax.data import CONCEPTS, _corpus, _render, corpus_batch, corpus_example


def test_same_seed_same_bytes_and_random_access():
    a_img, a_cap, a_con = corpus_batch(3, 10, 20)
    b_img, b_cap, b_con = corpus_batch(3, 10, 20)
    np.testing.assert_array_equal(a_img, b_img)
    assert a_cap == b_cap
    np.testing.assert_array_equal(a_con, b_con)
    # Example i does not depend on which batch it was drawn in.
    single = corpus_example(3, 17)
    np.testing.assert_array_equal(single.image, a_img[7])
    assert single.caption == a_cap[7]
    # Another seed draws other images.
    c_img, _, _ = corpus_batch(4, 10, 20)
    assert not np.array_equal(a_img, c_img)
    assert a_img.dtype == np.uint8 and a_img.shape == (20, 32, 32, 3)


def _colour_near(image: np.ndarray, name: str, tol: float = 75.0) -> int:
    target = np.asarray(_render.COLOURS[name], np.float32)
    dist = np.linalg.norm(image.astype(np.float32) - target, axis=-1)
    return int((dist < tol).sum())


def test_captions_name_what_is_drawn():
    words = set(_corpus.caption_words())
    kinds = set()
    for i in range(300):
        ex = corpus_example(0, i)
        kinds.add(ex.kind)
        cap = ex.caption
        tokens = re.findall(r"[a-z]+|\d", cap)
        assert set(tokens) <= words, (cap, set(tokens) - words)
        a = ex.attributes
        if ex.kind == "glyph":
            char = a["char"].lower()
            if a["category"] == "digit":
                assert char in cap or _render.DIGIT_NAMES[int(char)] in cap.split(), cap
            elif a["category"] == "greek":
                name = dict(_render.GREEK)[a["char"]]
                assert name in cap.split(), cap
            else:
                assert char in cap.split(), cap
        elif ex.kind in ("shape", "multi"):
            assert a["shape"] in cap, cap
        elif ex.kind == "texture":
            adj, nouns = _corpus.TEXTURE_WORDS[a["texture"]]
            assert adj in cap or any(n.split()[-1] in cap for n in nouns), cap
        if ex.concept >= 0:  # the concept is the object the caption names
            name = CONCEPTS[ex.concept].split()[-1]
            said = re.findall(r"[a-z]+|\d", cap)
            assert name in said or (
                a.get("category") == "digit" and _render.DIGIT_NAMES[int(name)] in said
            ), cap
        # A named foreground colour is really painted (jitter and noise within tolerance).
        named = [c for c in _render.COLOURS if re.search(rf"\b{c}\b", cap)]
        if ex.kind in ("glyph", "shape") and named:
            assert any(_colour_near(ex.image, c) >= 3 for c in named), cap
    assert kinds == {"glyph", "shape", "texture", "multi"}


def test_glyphs_are_drawn_in_pretraining_fonts_only():
    fonts = {corpus_example(0, i).attributes.get("font") for i in range(400)} - {None}
    assert fonts and fonts <= set(_render.PRETRAIN_FONTS)
    assert not set(_render.PRETRAIN_FONTS) & set(_render.HELDOUT_FONTS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="index"):
        corpus_example(0, -1)
    with pytest.raises(ValueError, match="count"):
        corpus_batch(0, 0, -2)
