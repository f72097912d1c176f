"""The domain-upsampling experiment: its tiny preset runs and draws exactly the scheduled mix."""

import json

import numpy as np
import pytest

from cljax.data import mixed_batch_counts


@pytest.mark.slow
def test_tiny_preset_follows_the_schedule(tmp_path):
    from experiments import mixtures

    res = mixtures.main(["--preset", "tiny", "--out", str(tmp_path)])
    cfg = mixtures.PRESETS["tiny"]
    assert [r["f (%)"] for r in res["rows"]] == ["0", "30"]
    # oracle: domain examples drawn = natural counts before the switch, upsampled after
    sizes = [cfg.general_size] * len(cfg.general) + [cfg.domain_size]
    natural = np.asarray(sizes, float) / sum(sizes)
    up = np.append(natural[:-1] / natural[:-1].sum() * (1 - cfg.upsample_weight), 0.0)
    up[-1] = cfg.upsample_weight
    for run in res["per_run"]:
        switch = round((1 - run["fraction"]) * cfg.steps)
        want = (
            switch * mixed_batch_counts(natural, cfg.batch_size)[-1]
            + (cfg.steps - switch) * mixed_batch_counts(up, cfg.batch_size)[-1]
        )
        assert run["domain_examples_seen"] == want, run
        assert set(run["per_task"]) == {*cfg.general, cfg.domain}
        for acc in run["per_task"].values():
            assert 0.0 <= acc <= 100.0
        # the domain task is learned well above chance (10 classes: 10 %)
        assert run["domain"] > 40.0, run
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == res["rows"]


def test_schedule_for_switches_at_the_right_step():
    from experiments import mixtures

    natural = np.array([0.6, 0.3, 0.1])
    s = mixtures.schedule_for(0.2, 100, natural, 0.5)
    assert s.boundaries == (0, 80)
    np.testing.assert_allclose(s(79), natural)
    np.testing.assert_allclose(s(80), [1 / 3, 1 / 6, 0.5])
    assert mixtures.schedule_for(0.0, 100, natural, 0.5).boundaries == (0,)
    np.testing.assert_allclose(mixtures.schedule_for(1.0, 100, natural, 0.5)(0)[-1], 0.5)


def test_every_flag_has_help_and_bad_settings_raise():
    from experiments import mixtures

    assert set(mixtures.HELP) == set(mixtures.Config.__dataclass_fields__)
    with pytest.raises(ValueError, match=r"domain='digits' is also among general"):
        mixtures.run(mixtures.Config(general=("digits",), domain="digits"))
    with pytest.raises(ValueError, match=r"fractions: 1.5 must be in \[0, 1\]"):
        mixtures.run(mixtures.Config(fractions=(1.5,)))
