"""The CLIP preset of the merging experiment on a tiny random CLIP and mock TFDS data."""

import json

import pytest


@pytest.mark.slow
def test_clip_tiny_preset_runs_end_to_end(tmp_path):
    from experiments import merging

    res = merging.main(["--preset", "clip-tiny", "--out", str(tmp_path)])
    methods = [r["method"] for r in res["rows"]]
    assert methods[0] == "zero-shot" and methods[-1] == "fine-tuned (each its own)"
    assert any(m.startswith("task arithmetic (λ=") for m in methods)
    assert any(m.startswith("TIES dis-mean") for m in methods) and any(
        m.startswith("TIES dis-sum") for m in methods
    )
    assert "aTLAS" in methods
    for row in res["rows"]:
        assert 0.0 <= row["mean"] <= 100.0 and set(row) >= {"mnist", "svhn", "normalised"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == res["rows"]
    assert list((tmp_path / "heads").glob("head-*.npz")), "zero-shot heads are cached on disk"


def test_clip_preset_needs_a_checkpoint(tmp_path):
    from experiments import merging

    with pytest.raises(ValueError, match="--clip_path is required"):
        merging.main(["--preset", "clip-vit-b32", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not one of"):
        merging.main(["--preset", "clip-vit-h99", "--out", str(tmp_path)])
