"""Smoke test of experiments/continual.py with its tiny preset (and its resume path)."""

import json

import pytest

from experiments import continual


@pytest.mark.slow
def test_tiny_preset_runs_and_resumes(tmp_path):
    out = tmp_path / "cl"
    rows = continual.main(["--preset", "tiny", "--out", str(out)])
    assert [r["method"] for r in rows] == ["naive", "gpm"]
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 2
    for r in res["runs"]:
        assert len(r["accuracy"]) == 2 and {"acc", "bwt"} <= set(r["metrics"])
    assert (out / "heatmap_pmnist.png").stat().st_size > 0
    assert (out / "acc.png").stat().st_size > 0
    # Re-running with the same folder reuses the finished runs.
    again = continual.main(["--preset", "tiny", "--out", str(out)])
    assert again == rows


def test_bad_names():
    cfg = continual.PRESETS["tiny"]
    with pytest.raises(ValueError, match=r"unknown benchmark 'cifar'"):
        continual._benchmark("cifar", cfg, 0)
