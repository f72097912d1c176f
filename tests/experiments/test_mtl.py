import json

import pytest

from experiments import mtl


@pytest.mark.slow
def test_tiny_preset_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "mtl"
    res = mtl.main(["--preset", "tiny", "--out", str(out)])
    rows = res["summary"]["multi_mnist"]
    assert [r["method"] for r in rows] == ["single-task", "MGDA", "F-MGDA"]
    assert (out / "results.json").exists() and (out / "mtl_multi_mnist.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == {
        "multi_mnist/stl0/0",
        "multi_mnist/stl1/0",
        "multi_mnist/mgda/0",
        "multi_mnist/f-mgda/0",
    }
    # A second run finds every run in its checkpoint and trains nothing.
    res2 = mtl.main(["--preset", "tiny", "--out", str(out)])
    assert res2["runs"] == res["runs"]


def test_multi_mnist_gen_dataset_loads():
    import dataclasses

    cfg = dataclasses.replace(mtl.PRESETS["tiny"], num_train=64, num_val=16, num_test=16)
    left, right = mtl.load("multi_mnist_gen", cfg)
    assert left.x_train.shape == (64, 36, 36, 1) and len(right.y_test) == 16
