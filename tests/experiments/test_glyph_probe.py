import json

import pytest

from experiments import glyph_probe


def test_bad_init_is_rejected_by_name():
    cfg = glyph_probe.PRESETS["tiny"]
    with pytest.raises(ValueError, match="init='imagenet'"):
        glyph_probe.run(glyph_probe.Config(**{**cfg.__dict__, "init": "imagenet"}))


@pytest.mark.long  # make test-long: loads MiniCLIP, compiles its tower, renders a task
def test_tiny_preset_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "run"
    results = glyph_probe.main(["--preset", "tiny", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert saved["probe"] == results["probe"] and set(saved["probe"]) == {"mnist"}
    assert [r["step"] for r in saved["curve"]] == [0, 2, 4]
    assert all(0.0 <= r["heldout"] <= 100.0 for r in saved["curve"])
    assert saved["train_images"] < 200  # only single-object scenes are kept
    assert "held-out corpus" in capsys.readouterr().out


@pytest.mark.parametrize(
    "field, value, init",
    [
        ("scenes", "imagenet", "scratch"),
        ("tower", "resnet", "scratch"),
        ("tower", "cnn", "pretrained"),
    ],
)
def test_bad_scenes_and_towers_are_rejected_by_name(field, value, init):
    cfg = {**glyph_probe.PRESETS["tiny"].__dict__, field: value, "init": init}
    with pytest.raises(ValueError, match=f"{field}='{value}'|init='{init}'"):
        glyph_probe.run(glyph_probe.Config(**cfg))


def test_legible_glyphs_are_deterministic_centred_glyph_classes():
    import numpy as np

    from cljax.data import CONCEPTS

    x, y = glyph_probe._legible_glyphs(3, 24)
    x2, y2 = glyph_probe._legible_glyphs(3, 24)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (24, 32, 32, 3) and x.dtype == np.uint8
    assert all(CONCEPTS[c].split()[0] in ("digit", "letter", "greek") for c in y)
    assert not np.array_equal(glyph_probe._legible_glyphs(4, 24)[0], x)
    # The glyph is the pixels far from the background colour (a corner pixel): large and centred.
    for image in x.astype(np.float32):
        far = np.abs(image - image[0, 0]).sum(-1) > 120
        rows, cols = np.nonzero(far)
        assert far.sum() > 25
        # Centred on the font's middle line, so a lowercase letter's box sits a little low.
        assert abs((rows.min() + rows.max()) / 2 - 15.5) < 8
        assert abs((cols.min() + cols.max()) / 2 - 15.5) < 6
        assert rows.max() - rows.min() >= 10  # at least 10 of 32 px tall


@pytest.mark.long  # make test-long: loads MiniCLIP, renders a task
def test_tiny_preset_with_legible_glyphs_and_the_reference_cnn(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    argv = ["--preset", "tiny", "--out", str(tmp_path / "run"), "--init", "scratch"]
    results = glyph_probe.main([*argv, "--scenes", "legible", "--tower", "cnn"])
    assert results["train_images"] == glyph_probe.PRESETS["tiny"].train_corpus
    assert [r["step"] for r in results["curve"]] == [0, 2, 4]
    assert 0.0 <= results["probe"]["mnist"] <= 100.0


def test_mnist_scenes_are_the_benchmarks_real_digits():
    import numpy as np

    x_train, y_train, x_test, y_test = glyph_probe._mnist_digits(40, 30)
    assert x_train.shape == (40, 32, 32, 3) and x_test.shape == (30, 32, 32, 3)
    assert set(np.unique(y_train)) <= set(range(10)) and len(np.unique(y_train)) > 5
    # No training image is also a held-out one.
    train_bytes = {im.tobytes() for im in x_train}
    assert not any(im.tobytes() in train_bytes for im in x_test)
