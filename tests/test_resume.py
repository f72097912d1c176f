"""Crash and resume: SIGKILL a continual run at random points, re-run it, get identical results.

``tests/_resume_child.py`` runs a three-task continual sequence with GPM and checkpoints at
every task boundary (and every 7 steps with ``--checkpoint-every 7``). The reference runs
uninterrupted, without mid-task checkpoints. Each trial kills the child with SIGKILL, re-runs
it with the same folder until it finishes, and its results (accuracy matrix, metrics,
fingerprints of the final params and optimizer state, projection memory included) must equal
the reference's bit for bit. One trial kills inside a mid-task checkpoint write (after the
arrays are on disk, before the atomic rename), then after a chosen mid-task step, and checks
the last run resumed inside the task; the others kill after a random fraction of the
reference's wall time (in training, evaluation or a checkpoint write), one with boundary
checkpoints only, one with mid-task checkpoints.

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

    # a kill inside the 3rd save (mid-task, at step 21: 7 and 14 are done), then one after
    # step 50 (task 1, step 10: saved at 49), then to the end
    out = tmp_path / "mid-task"
    args = ("--checkpoint-every", "7", "--kill-in-save", "3", "--kill-at-step", "50")
    r = _run_to_end(out, *args)
    assert r.returncode == -signal.SIGKILL, "the child should have been killed inside a save"
    assert (out / "killed-in-save").exists() and not (out / "results.json").exists()
    leftovers = [p.name for p in (out / "ckpt" / "mid_task").iterdir()]
    assert any(n.startswith(".tmp-") for n in leftovers), leftovers  # the half-written save
    r = _run_to_end(out, *args)
    assert r.returncode == -signal.SIGKILL, "the child should have been killed after step 50"
    assert (out / "killed-at-step").exists() and not (out / "results.json").exists()
    r = _run_to_end(out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "resumed.json").read_text()) == {"task": 1, "step": 9}
    assert _results(out) == reference

    # random kill points; trial 1 with mid-task checkpoints
    rnd = random.Random(1234)
    for trial in range(2):
        out = tmp_path / f"trial{trial}"
        extra = ("--checkpoint-every", "7") if trial == 1 else ()
        kills = 0
        for _ in range(2):
            p = subprocess.Popen(
                [sys.executable, str(CHILD), str(out), *extra],
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
        r = _run_to_end(out, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert _results(out) == reference, (
            f"trial {trial} ({kills} kills): results differ after resume"
        )
