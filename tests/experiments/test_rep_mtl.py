import numpy as np
import pytest

from cljax.checkpoint import load_json
from experiments import rep_mtl


@pytest.mark.slow
def test_tiny_preset_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "rep_mtl"
    res = rep_mtl.main(["--preset", "tiny", "--out", str(out)])
    (row,) = res["summary"]["multi_mnist"]
    assert row["method"] == "PCGrad + Rep-MTL" and "Δm%" not in row  # no single-task runs
    run = res["runs"]["multi_mnist/pcgrad+rep/0"]
    assert len(run["test"]) == 2 and all(0.0 <= a <= 100.0 for a in run["test"])
    saved = load_json(out / "runs.json")
    assert set(saved["runs"]) == {"multi_mnist/pcgrad+rep/0"}
    assert (out / "results.json").exists()
    # a second run finds the finished run and trains nothing
    res2 = rep_mtl.main(["--preset", "tiny", "--out", str(out)])
    assert res2["runs"] == res["runs"]
    # a truncated record is moved aside and its runs are redone, to the same numbers
    record = out / "runs.json"
    record.write_bytes(record.read_bytes()[:40])
    with pytest.warns(UserWarning, match="runs.json"):
        res3 = rep_mtl.main(["--preset", "tiny", "--out", str(out)])
    assert res3["runs"]["multi_mnist/pcgrad+rep/0"]["test"] == run["test"]
    assert list(out.glob("runs.json.corrupt-*"))


def test_summary_delta_m_against_single_task():
    cfg = rep_mtl.PRESETS["tiny"]
    cfg = type(cfg)(**{**cfg.__dict__, "methods": ("ew", "ew+rep"), "seeds": (0, 1)})
    tasks = [type("T", (), {"name": n})() for n in ("left", "right")]
    done = {f"d/stl{k}/{s}": {"test": [50.0]} for k in range(2) for s in (0, 1)}
    done |= {f"d/ew/{s}": {"test": [45.0, 40.0]} for s in (0, 1)}
    done |= {"d/ew+rep/0": {"test": [50.0, 55.0]}, "d/ew+rep/1": {"test": [60.0, 45.0]}}
    rows = rep_mtl.summarize(cfg, "d", tasks, done)
    assert [r["method"] for r in rows] == ["single-task", "EW", "EW + Rep-MTL"]
    np.testing.assert_allclose(rows[1]["_dm"], -15.0)  # mean of -10 % and -20 %
    np.testing.assert_allclose(rows[2]["_dm"], 5.0)  # seeds: (0 + 10) / 2, (20 - 10) / 2
    np.testing.assert_allclose(rows[2]["_dm_std"], 0.0)


def test_unknown_method_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'sgd\\+rep'"):
        rep_mtl.main(["--preset", "tiny", "--methods", "sgd+rep", "--out", str(tmp_path)])
