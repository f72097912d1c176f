"""The ZSCL experiment: its table on a hand-computed matrix, and a tiny end-to-end run."""

import json

import numpy as np
import pytest

from experiments import zscl


def test_table_matches_hand_computed_transfer_avg_last():
    # A[j, i]: after task j, on task i (percent).
    a = np.array([[90.0, 40.0, 30.0], [80.0, 95.0, 20.0], [70.0, 85.0, 99.0]])
    # Transfer: mean over i >= 1 of mean_{j < i} A[j, i] = mean(40, mean(30, 20)) = 32.5
    # Avg: mean over i of the column means = mean(80, 73.33.., 49.66..) = 67.66..
    # Last: mean of the last row = 84.66..
    b = a - 10.0
    results = {
        "tasks": ["a", "b", "c"],
        "zero_shot": [50.0, 40.0, 30.0],
        "runs": {
            "m": [
                {"accuracy": a.tolist(), "transfer": 32.5, "avg": 203 / 3, "last": 254 / 3},
                {"accuracy": b.tolist(), "transfer": 22.5, "avg": 173 / 3, "last": 224 / 3},
            ]
        },
    }
    # the per-run numbers are what cljax.continual computes
    from cljax import continual

    for run in results["runs"]["m"]:
        acc = np.asarray(run["accuracy"])
        assert continual.mtil_transfer(acc) == pytest.approx(run["transfer"])
        assert continual.mtil_avg(acc) == pytest.approx(run["avg"])
        assert continual.mtil_last(acc) == pytest.approx(run["last"])
    table, rows = zscl.summarize(results)
    # zero-shot: every row is the zero-shot accuracies -> Transfer = mean(40, 30) = 35
    assert rows[0] == {"method": "zero-shot", "Transfer": "35.0", "Avg": "40.0", "Last": "40.0"}
    # mean ± sample std over the two runs: 27.5 ± 7.1, 62.7 ± 7.1, 79.7 ± 7.1
    assert rows[1] == {
        "method": "m",
        "Transfer": "27.5 ± 7.1",
        "Avg": "62.7 ± 7.1",
        "Last": "79.7 ± 7.1",
    }
    assert "| zero-shot" in table
    assert "85.0" in zscl.matrices(results)  # seed-mean of 90 and 80: after task 0, on task a


def test_unknown_method_and_preset():
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        zscl._flags("sgd")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        zscl.main(["--preset", "huge"])


@pytest.mark.slow
def test_tiny_preset_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    argv = ["--preset", "tiny", "--out", str(tmp_path), "--methods", "finetune", "zscl"]
    res = zscl.main(argv)
    assert res["tasks"] == ["rotated", "digits", "parity"]
    for method in ("finetune", "zscl"):
        (run,) = res["runs"][method]
        acc = np.asarray(run["accuracy"])
        assert acc.shape == (3, 3) and np.isfinite(acc).all()
        assert 0 <= acc.min() and acc.max() <= 100
    assert len(res["zero_shot"]) == 3
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"]["zscl"][0]["accuracy"] == res["runs"]["zscl"][0]["accuracy"]
    assert (tmp_path / "metrics.png").exists() and (tmp_path / "matrices.png").exists()
    # a re-run resumes from the finished checkpoints and reproduces the numbers
    again = zscl.main(argv[:-2] + ["zscl"])
    assert again["resumed_from"] == {"zscl": 3}
    assert again["runs"]["zscl"] == res["runs"]["zscl"]


@pytest.mark.slow
def test_nonfinite_training_stops_naming_method_and_task(tmp_path, monkeypatch):
    """A learning rate that overflows the weights: an error, no checkpoint of the task."""
    from cljax.train import NonFiniteError

    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    argv = ["--preset", "tiny", "--out", str(tmp_path), "--methods", "finetune", "--lr", "1e38"]
    with pytest.raises(NonFiniteError, match=r"finetune: non-finite .* task 0 \('rotated'\)"):
        zscl.main(argv)
    assert not list((tmp_path / "ckpt" / "finetune").glob("step_*"))
