"""The DANN two-moons experiment: its tiny preset runs, DANN beats source-only on the target and
leaves features whose domains are harder to tell apart."""

import json

import pytest


@pytest.mark.slow
def test_tiny_preset_dann_beats_source_only(tmp_path):
    from experiments import dann

    res = dann.main(["--preset", "tiny", "--out", str(tmp_path)])
    assert [r["method"] for r in res["rows"]] == ["source only", "DANN"]
    for r in res["per_seed"]:
        # measured: source-only 65.3 / 69.3 %, DANN 70.3 / 80.7 % on the rotated target
        assert r["dann"]["target"] > r["source_only"]["target"], r
        # measured: a fresh domain classifier on frozen features, 81.2 / 81.5 % source-only,
        # 72.8 / 75.0 % DANN (50 % is chance)
        assert r["dann"]["domain_probe"] < r["source_only"]["domain_probe"], r
        assert r["source_only"]["source"] > 95.0 and r["dann"]["source"] > 95.0, r
    so, da = (res["rows"][i]["_target"] for i in (0, 1))
    assert da > so + 3.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == res["rows"]


def test_every_flag_has_help():
    from experiments import dann

    assert set(dann.HELP) == {f for f in dann.Config.__dataclass_fields__}
