"""Crash and resume: SIGKILL a continual run at random points, re-run it, get identical results.

``tests/_resume_child.py`` runs a three-task continual sequence with GPM and checkpoints at
every task boundary. The reference runs uninterrupted. In each trial the child is killed with
SIGKILL after a random fraction of the reference's wall time (in training, evaluation or a
checkpoint write), re-run with the same folder until it finishes, and its results (accuracy
matrix, metrics, fingerprints of the final params and optimizer state, projection memory
included) must equal the reference's bit for bit. One trial kills inside a checkpoint write,
after the arrays are on disk and before the atomic rename.

The experiments' own runners resume the same way; their tiny presets are too slow to kill
repeatedly in CI, so this uses the runner directly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("_resume_child.py")


def _env():
    env = dict(os.environ)
    env["CLJAX_NO_PROGRESS"] = "1"
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's run
    return env


def _run_to_end(out, *extra):
    r = subprocess.run(
        [sys.executable, str(CHILD), str(out), *extra],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_results(tmp_path):
    t0 = time.perf_counter()
    r = _run_to_end(tmp_path / "reference")
    assert r.returncode == 0, r.stderr[-3000:]
    duration = time.perf_counter() - t0
    reference = _results(tmp_path / "reference")
    assert len(reference["accuracy"]) == 3

    # a kill inside the second checkpoint write: the rename never happens
    out = tmp_path / "in-save"
    r = _run_to_end(out, "--kill-in-save", "2")
    assert r.returncode == -signal.SIGKILL, "the child should have been killed inside a save"
    assert (out / "killed-in-save").exists() and not (out / "results.json").exists()
    leftovers = [p.name for p in (out / "ckpt").iterdir()]
    assert any(n.startswith(".tmp-") for n in leftovers), leftovers  # the half-written save
    r = _run_to_end(out, "--kill-in-save", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _results(out) == reference

    # random kill points
    rnd = random.Random(1234)
    for trial in range(2):
        out = tmp_path / f"trial{trial}"
        kills = 0
        for _ in range(2):
            p = subprocess.Popen(
                [sys.executable, str(CHILD), str(out)],
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                p.wait(timeout=rnd.uniform(0.3, 0.95) * duration)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
        r = _run_to_end(out)
        assert r.returncode == 0, r.stderr[-3000:]
        assert _results(out) == reference, (
            f"trial {trial} ({kills} kills): results differ after resume"
        )
