"""``python -m experiments.zscl --workers N``: the methods split over N processes of the same
command, with the results of one process.

The split, the worker count and the parent's handling of its workers run on stand-in workers
(a few lines of Python that write a record or fail), in a fraction of a second; the real
workers -- the same numbers as one process, a killed run resumed by the same command -- in
the long tier (each worker builds MiniCLIP's setting and compiles its steps)."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import zscl


def _loads(groups):
    return [sum(zscl.METHOD_COST[m] for m in g) for g in groups]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 9])
def test_split_methods_is_a_balanced_partition_in_order(n):
    methods = zscl.METHODS
    groups = zscl.split_methods(methods, n)
    assert len(groups) == min(n, len(methods))
    assert sorted(m for g in groups for m in g) == sorted(methods)  # each method once
    for g in groups:  # a group keeps the order of the methods
        assert list(g) == [m for m in methods if m in g]
    if n >= len(methods):  # one method a worker
        assert all(len(g) == 1 for g in groups)
    elif n <= 3:  # no partition into n groups has a smaller largest load (brute force)
        best = min(
            max(
                sum(zscl.METHOD_COST[m] for m, k in zip(methods, assign, strict=True) if k == j)
                for j in range(n)
            )
            for assign in itertools.product(range(n), repeat=len(methods))
        )
        assert max(_loads(groups)) == pytest.approx(best)


def test_num_workers_is_one_per_core_at_most_one_per_method(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    cfg = zscl.EmbeddedConfig()
    assert cfg.workers == 0 and zscl.num_workers(cfg) == 3  # the default: the cores
    assert zscl.num_workers(zscl.EmbeddedConfig(methods=("zscl", "lwf"))) == 2
    assert zscl.num_workers(zscl.EmbeddedConfig(workers=1)) == 1
    assert zscl.num_workers(zscl.EmbeddedConfig(workers=9)) == len(zscl.METHODS)
    assert zscl.EMBEDDED_PRESETS["tiny"]["workers"] == 1  # a smoke run stays in one process


def test_bad_workers_and_repeated_methods_rejected_before_any_work(tmp_path):
    out = ["--out", str(tmp_path)]
    with pytest.raises(ValueError, match=r"default: workers=-1 must be an integer >= 0"):
        zscl.main([*out, "--workers", "-1"])
    with pytest.raises(ValueError, match=r"methods=\('zscl', 'lwf', 'zscl'\) names a method"):
        zscl.main([*out, "--methods", "zscl", "lwf", "zscl"])
    assert not list(tmp_path.iterdir())  # nothing was drawn, started or written


# A stand-in worker: the record of its methods (a fingerprint of the method and seed as its
# accuracies), or a failure for one method, or a long sleep. It also records what the parent
# gave it: its command line and environment.
_WORKER = r"""
import json, os, sys, time
argv = sys.argv[1:]
methods = argv[len(argv) - argv[::-1].index("--methods") : -2]
if "lwf" in methods:
    print("Traceback (most recent call last):\nValueError: lwf: boom", file=sys.stderr)
    sys.exit(1)
if "sleep" in argv:
    time.sleep(60)
runs = {m: [{"seed": 0, "accuracy": [[float(len(m)), 0.5]], "resumed_from": 0}] for m in methods}
record = {
    "tasks": ["a", "b"], "reference": {}, "zero_shot": [1.0, 2.0],
    "setup_seconds": 1.0, "setup_cpu_seconds": 1.0, "seconds": 2.0, "cpu_seconds": 2.0,
    "runs": runs,
    "seconds_per_method": {m: 1.0 for m in methods},
    "cpu_seconds_per_method": {m: 1.0 for m in methods},
    "argv": argv,
    "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "CLJAX_NO_PROGRESS")},
}
with open(os.environ["CLJAX_ZSCL_WORKER_RECORD"], "w") as f:
    json.dump(record, f)
"""


def _stand_in(tmp_path, monkeypatch, methods, argv=()):
    monkeypatch.setattr(zscl, "_draw_benchmark", lambda cfg: None)  # no images to draw
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    cfg = zscl.EmbeddedConfig(methods=methods, seeds=(0,), tasks=("a", "b"), out=str(tmp_path))
    groups = zscl.split_methods(methods, 2)
    cmd = (sys.executable, "-c", _WORKER)
    return cfg, groups, lambda: zscl.run_workers(cfg, list(argv), groups, command=cmd)


def test_workers_results_are_gathered_in_the_order_of_the_methods(tmp_path, monkeypatch):
    methods = ("finetune", "zscl", "we", "distill")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    cfg, groups, run = _stand_in(tmp_path, monkeypatch, methods, ["--seeds", "0"])
    assert groups == [("finetune", "zscl"), ("we", "distill")]
    res = run()
    assert list(res["runs"]) == list(methods)  # the order of one process
    assert res["runs"]["distill"][0]["accuracy"] == [[7.0, 0.5]]  # distill's own record
    assert res["zero_shot"] == [1.0, 2.0] and tuple(res["config"]["methods"]) == methods
    assert [w["methods"] for w in res["workers"]] == [list(g) for g in groups]
    for k, group in enumerate(groups):
        part = json.loads((tmp_path / "workers" / f"worker{k}.json").read_text())
        # the same command with its group of methods, in one process, with XLA's settings
        # of this one (the same compiled programs, the same numbers)
        assert part["argv"] == ["--seeds", "0", "--methods", *group, "--workers", "1"]
        assert part["env"]["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
        assert part["env"]["CLJAX_NO_PROGRESS"] == "1"


def test_failed_worker_stops_the_others_and_raises_its_message(tmp_path, monkeypatch):
    # worker 0 (lwf) fails at once; worker 1 would sleep for a minute
    _, groups, run = _stand_in(tmp_path, monkeypatch, ("lwf", "finetune"), ["sleep"])
    assert groups == [("lwf",), ("finetune",)]
    t0 = time.perf_counter()
    with pytest.raises(
        RuntimeError,
        match=r"(?s)worker 0 \(--methods lwf\) failed with exit code 1.*ValueError: lwf: boom",
    ):
        run()
    assert time.perf_counter() - t0 < 30  # the sleeping worker was stopped, not awaited
    assert not (tmp_path / "results.json").exists()


def test_workers_disagreeing_on_zero_shot_raise(tmp_path, monkeypatch):
    cfg, groups, _ = _stand_in(tmp_path, monkeypatch, ("finetune", "zscl"))
    part = {"tasks": [], "reference": {}, "setup_seconds": 0, "setup_cpu_seconds": 0}
    parts = [{**part, "zero_shot": [1.0]}, {**part, "zero_shot": [1.5]}]
    with pytest.raises(RuntimeError, match="workers 0 and 1 disagree on the zero-shot"):
        zscl._merge(cfg, groups, parts)


# ------------------------------------------------------------------ the real workers


def _children(pid):
    """The process ids whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.long  # each worker builds MiniCLIP's setting and compiles its steps
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_workers_give_one_process_results_and_a_killed_run_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    argv = ["--preset", "tiny", "--methods", "finetune", "zscl"]
    one = zscl.main([*argv, "--out", str(tmp_path / "one")])
    assert one["config"]["workers"] == 1 and "workers" not in one

    # --workers 2 in a process of its own, killed (SIGKILL) once a task is checkpointed:
    # its workers end with it, and the same command resumes from their checkpoints
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "experiments.zscl", *argv, "--workers", "2", "--out", str(two)]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not list(two.glob("ckpt/*/seed0/step_*")) and time.time() < deadline:
            assert parent.poll() is None, "the run ended before it was killed"
            time.sleep(0.5)
        workers = _children(parent.pid)
        assert len(workers) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a worker outlived its killed parent"

    res = zscl.main([*argv, "--workers", "2", "--out", str(two)])
    assert [w["methods"] for w in res["workers"]] == [["zscl"], ["finetune"]]
    assert any(r["resumed_from"] > 0 for m in res["runs"] for r in res["runs"][m])
    saved = {
        k: json.loads((d / "results.json").read_text())
        for k, d in (("one", tmp_path / "one"), ("two", two))
    }
    for key in ("tasks", "zero_shot", "table", "targets"):
        assert saved["two"][key] == saved["one"][key], key
    for m in ("finetune", "zscl"):  # bitwise: the accuracy matrices and their metrics
        for a, b in zip(saved["one"]["runs"][m], saved["two"]["runs"][m], strict=True):
            assert np.array_equal(a["accuracy"], b["accuracy"]), m
            assert (a["transfer"], a["avg"], a["last"]) == (b["transfer"], b["avg"], b["last"])
