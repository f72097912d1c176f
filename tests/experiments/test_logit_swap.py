"""The logit-swap experiment: its tiny preset runs every method from one shared first model."""

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_tiny_preset_runs_all_methods_from_one_start(tmp_path):
    from experiments import logit_swap

    res = logit_swap.main(["--preset", "tiny", "--out", str(tmp_path)])
    cfg = logit_swap.PRESETS["tiny"]
    assert [r["method"] for r in res["rows"]] == list(cfg.methods)
    first = np.asarray(res["after_first"])
    for method, mat in res["matrices"].items():
        mat = np.asarray(mat)  # [seeds, after task, on domain]
        assert mat.shape == (len(cfg.seeds), len(cfg.domains), len(cfg.domains))
        np.testing.assert_array_equal(mat[:, 0], first)  # every method starts from one model
        # each method learns the second domain (10 classes: chance is 10 %)
        assert np.all(mat[:, 1, 1] > 40.0), (method, mat)
    assert np.all(first[:, 0] > 40.0)
    # the methods differ: distillation changes the training, not only CE
    assert res["matrices"]["ce"] != res["matrices"]["logit_swap"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == res["rows"]


def test_method_weights_and_flags():
    from experiments import logit_swap

    cfg = logit_swap.Config(lwf_weight=0.7)
    assert logit_swap.method_weights(cfg, "ce") == (1.0, 0.0, 0.0)
    assert logit_swap.method_weights(cfg, "lwf") == (1.0, 0.7, 0.0)
    assert logit_swap.method_weights(cfg, "logit_swap") == (0.0, 0.0, 1.0)
    assert logit_swap.method_weights(cfg, "ce+logit_swap") == (1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"methods: 'ewc' must be one of"):
        logit_swap.method_weights(cfg, "ewc")
    assert set(logit_swap.HELP) == set(logit_swap.Config.__dataclass_fields__)
