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
