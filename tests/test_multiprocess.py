"""Two local processes over gloo: a sharded training and a merge agree with one process.

Also covers the launcher (``experiments/launch.py``) and the 2-processes-to-1 checkpoint
restore. Each worker is ``python -m experiments.launch ... selftest`` with 4 simulated CPU
devices, so the two processes form one 8-device mesh.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cljax import sharding as cs
from cljax.checkpoint import CheckpointManager
from experiments import launch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path: Path, *selftest_args: str) -> list[str]:
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1", "CLJAX_NO_PROGRESS": "1"}
    procs = []
    for i in range(2):
        cmd = [
            sys.executable, "-m", "experiments.launch",
            "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
            "--process_id", str(i), "--cpu_devices", "4", "--no_auto",
            "selftest", "--out", str(tmp_path), *selftest_args,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two processes did not finish in 240 s")
        outs.append(out)
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            if "gloo" in out.lower() and ("unimplemented" in out.lower() or "not" in out.lower()):
                pytest.skip(f"CPU collectives over gloo unavailable: {out[-300:]}")
            pytest.fail(f"a worker failed (rc={p.returncode}):\n{out[-3000:]}")
    return outs


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    outs = _run_two_processes(tmp_path, "--steps", "3", "--ckpt", str(tmp_path / "ckpt"))
    assert "selftest: 2 process(es), mesh {'data': 8}" in outs[0]
    assert "selftest:" not in outs[1]  # only process 0 prints
    p0, p1 = (dict(np.load(tmp_path / f"selftest_p{i}.npz")) for i in range(2))
    assert p0.keys() == p1.keys() and any(k.startswith("merged/") for k in p0)
    for k in p0:  # both processes hold the same global result
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)

    # the same selftest in this process, on 8 local devices
    single = launch.selftest(["--steps", "3"])
    assert single.keys() == p0.keys()
    for k in p0:
        np.testing.assert_allclose(p0[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.all(np.diff(single["losses"]) < 0)  # it trains

    # the checkpoint both processes wrote restores onto one process's 4-device mesh
    mesh = cs.make_mesh({"data": 2, "model": 2}, jax.devices()[:4])
    state, _, _, _, _, _ = launch.selftest_problem(mesh)
    abstract = jax.eval_shape(lambda s: s, state)
    sh = cs.named_shardings(abstract, mesh, [(r"kernel$", P(None, "model"))], default=cs.FSDP)
    restored, _ = CheckpointManager(tmp_path / "ckpt").restore(
        3, cs.abstract_with_shardings(abstract, sh)
    )
    assert int(restored.step) == 3
    assert restored.params["hidden"]["kernel"].sharding.spec == P(None, "model")
    got = {f"params/{k}": np.asarray(v) for k, v in launch._flat(restored.params).items()}
    chex.assert_trees_all_equal(got, {k: v for k, v in p0.items() if k.startswith("params/")})


def test_launcher_parses_and_resolves(monkeypatch):
    ns, args = launch.parse_args(
        ["--coordinator", "h:1", "--num_processes", "2", "--process_id", "1", "merging", "--x", "1"]
    )
    assert (ns.coordinator, ns.num_processes, ns.process_id, ns.target) == ("h:1", 2, 1, "merging")
    assert args == ["--x", "1"]
    assert launch._resolve("selftest") is launch.selftest
    assert launch._resolve("experiments.launch:selftest_data") is launch.selftest_data
    with pytest.raises(ValueError, match="has no function 'nope'"):
        launch._resolve("experiments.launch:nope")
    seen = []
    monkeypatch.setattr(launch, "_resolve", lambda t: lambda: seen.append(list(sys.argv)))
    launch.run_target("merging", ["--preset", "tiny"])
    assert seen == [["merging", "--preset", "tiny"]]


@pytest.mark.slow
def test_launcher_runs_selftest_in_one_process(capsys, monkeypatch):
    monkeypatch.setattr(cs, "setup_logging", lambda *a, **k: None)  # keep pytest's logging
    out = launch.main(["--no_auto", "selftest", "--steps", "2", "--mode", "dp"])
    assert out["losses"].shape == (2,)
    assert "selftest: 1 process(es), mesh {'data': 8}" in capsys.readouterr().out
