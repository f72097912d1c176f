"""Smoke test of experiments/atlas.py: the tiny preset runs end to end and writes its outputs."""

import json

import pytest

from experiments import atlas as atlas_exp


@pytest.mark.slow
def test_tiny_preset_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "atlas"
    # Negation and aTLAS×K share these code paths (fit, objectives, blocks); they are left out
    # to keep the smoke test short.
    args = ["--preset", "tiny", "--out", str(out), "--pool_dir", str(tmp_path / "pool")]
    args += ["--parts", "addition", "few_shot", "tta"]
    results = atlas_exp.main(args)
    for name in ("results.json", "tables.md", "atlas.png", "units.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"addition", "few_shot", "tta", "finetuned"}
    add = results["addition"]
    assert 0.0 <= add["task_arithmetic"]["absolute"] <= 100.0
    assert all(0.0 <= r["absolute"] <= 100.0 for r in add["aTLAS"])
    # The evidence for reading the result: the validation curve and the validation scores.
    first = add["aTLAS"][0]
    assert [h["epoch"] for h in first["history"]] == [0, 1]
    assert first["val_normalized"] == 100 * first["history"][first["best_epoch"]]["normalized"]
    ta = add["task_arithmetic"]
    assert len(ta["val_scores"]) == 3 and ta["val_normalized"] == max(ta["val_scores"])
    assert set(saved["few_shot"][0]) == {"k=1", "k=4"}
    # A re-run restores every unit from units.json instead of training again.
    units_before = (out / "units.json").read_text()
    atlas_exp.main(args)
    assert (out / "units.json").read_text() == units_before
