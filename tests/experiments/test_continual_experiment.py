"""Smoke test of experiments/continual.py with its tiny preset (and its resume path)."""

import json

import pytest

from experiments import continual


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
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


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x5A
    path.write_bytes(bytes(b))


def _flip_digit(path):
    """One digit of an accuracy changed: still valid JSON, only the checksum can tell."""
    text = path.read_text()
    i = text.index('"accuracy"') + text[text.index('"accuracy"') :].index(".") + 1
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])


RUN_FILE_DAMAGE = {
    "truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "flip byte": _flip,
    "flip digit": _flip_digit,
    "delete": lambda p: p.unlink(),
}


def _outcome(runs):
    """Runs or table rows without their timings (a recomputed run takes another time)."""
    drop = ("seconds", "resumed_from", "s/run")
    return [{k: v for k, v in r.items() if k not in drop} for r in runs]


@pytest.mark.slow
def test_damaged_run_records_are_moved_aside_and_recomputed(tmp_path, recwarn):
    """Each kind of damage to runs/*.json: the re-run finishes with identical results."""
    out = tmp_path / "cl"
    args = ["--preset", "tiny", "--out", str(out)]
    rows = _outcome(continual.main(args))
    runs = _outcome(json.loads((out / "results.json").read_text())["runs"])
    records = sorted((out / "runs").glob("*.json"))
    assert len(records) == 2
    for name, damage in RUN_FILE_DAMAGE.items():
        for path in records:
            damage(path)
        assert _outcome(continual.main(args)) == rows, name
        assert _outcome(json.loads((out / "results.json").read_text())["runs"]) == runs, name
        assert all(path.is_file() for path in records), name  # written again
    # every damaged record was kept, none deleted: 3 damages that corrupt x 2 records
    assert len(list((out / "runs").glob("*.json.corrupt-*"))) == 6
    assert _outcome(continual.main(args)) == rows  # and a plain re-run reuses the rewritten records


def test_bad_names():
    cfg = continual.PRESETS["tiny"]
    with pytest.raises(ValueError, match=r"unknown benchmark 'cifar'"):
        continual._benchmark("cifar", cfg, 0)
