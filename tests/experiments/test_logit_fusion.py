"""The logit-fusion experiment: its tiny preset runs and its derived numbers are consistent."""

import json

import numpy as np
import pytest


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_tiny_preset_runs_and_reports_consistent_numbers(tmp_path):
    from experiments import logit_fusion

    res = logit_fusion.main(["--preset", "tiny", "--out", str(tmp_path)])
    acc = {k: np.asarray(v) for k, v in res["per_seed"].items()}
    large = acc["large (MiniCLIP zero-shot)"]
    ceiling = acc["large_ft (head fine-tuned, ceiling)"]
    for row in res["rows"]:
        a = acc[row["model"]]
        assert np.all((a >= 0) & (a <= 100))
        if row["model"].startswith("fused"):
            np.testing.assert_allclose(
                row["_recovered"], np.mean((a - large) / (ceiling - large)), rtol=1e-6
            )
    # fine-tuning helps both models on their training task (16 classes: chance 6.25 %)
    assert np.all(acc["small_ft"] > acc["small (distilled, zero-shot)"])
    assert np.all(ceiling > large)
    assert all(a in logit_fusion.GRID for a in res["alpha_best_on_val"])
    q10, _, q90 = res["dlf_alpha"]["quantiles_10_50_90"]
    assert 0.0 <= q10 <= q90 <= 2.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == res["rows"]


def test_every_flag_has_help():
    from experiments import logit_fusion

    assert set(logit_fusion.HELP) == set(logit_fusion.Config.__dataclass_fields__)
