"""Checkpoint and resume of the multi-task trainer (``experiments.mtl.train_one``).

A run is "crashed" in-process by a step wrapper that raises after a chosen number of steps;
re-running with the same folder must go through the same train states, step for step (every
leaf: parameters, Adam moments, PRNG key), and return the same result as an uninterrupted
run without checkpoints.
"""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from cljax import mtl
from cljax.checkpoint import tree_fingerprint
from cljax.data import Task
from experiments import mtl as mtl_exp

EVERY = 3  # 4 steps per epoch: mid-epoch saves at 3, 6, 9; epoch ends at 4, 8, 12


class _Crash(RuntimeError):
    pass


def _tasks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    ys = [(x[:, 0] > 0).astype(np.int32), np.digitize(x[:, 1], [-0.5, 0.5]).astype(np.int32)]
    out = []
    for k, (y, cls) in enumerate(zip(ys, ("ab", "abc"), strict=True)):
        out.append(Task(f"t{k}", tuple(cls), x[:64], y[:64], x[64:80], y[64:80], x[80:], y[80:]))
    return out


@pytest.fixture()
def trainer(monkeypatch):
    # train_one builds its optimiser per call, and a new optax transformation in the (static)
    # train state recompiles the step; one shared instance compiles it once for all runs.
    monkeypatch.setattr(mtl_exp.optax, "adam", functools.lru_cache(mtl_exp.optax.adam))
    cfg = dataclasses.replace(mtl_exp.PRESETS["tiny"], epochs=3, batch_size=16, width=1)
    tasks = _tasks()
    model = mtl.MultiHead(mtl_exp.MLPTrunk(cfg.width), (2, 3))
    grad_fn = mtl.mtl_grad_fn(
        mtl_exp.make_loss(model, (0, 1)), None, head_rules=mtl.HEAD_RULES, has_aux=True
    )
    step = mtl.make_mtl_step(grad_fn)
    predict = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return cfg, tasks, model, step, predict


def _run(trainer, states, crash=None, **kw):
    cfg, tasks, model, step, predict = trainer
    count = {"n": 0}

    def step_fn(state, batch):
        if count["n"] == crash:
            raise _Crash(f"crash after {crash} steps")
        count["n"] += 1
        # restored arrays are committed to the device, fresh ones are not, and jit compiles
        # each kind apart: committing them all compiles the step once for every run
        new, metrics = step(jax.device_put(state, jax.devices()[0]), batch)
        states[int(new.step)] = tree_fingerprint(new)
        return new, metrics

    return mtl_exp.train_one(cfg, tasks, (0, 1), step_fn, predict, model, seed=1, **kw)


@pytest.mark.slow
def test_crashed_run_resumes_bitwise(trainer, tmp_path):
    ref_states = {}
    reference = _run(trainer, ref_states)
    assert sorted(ref_states) == list(range(1, 13))
    d = tmp_path / "run"
    states = {}
    with pytest.raises(_Crash):  # after 7 steps: saved at 3, 4 and 6
        _run(trainer, states, crash=7, checkpoint_dir=d, checkpoint_every=EVERY)
    resumed = {}
    with pytest.raises(_Crash):  # resumes after step 6; crashes after 10 (saved at 8 and 9)
        _run(trainer, resumed, crash=4, checkpoint_dir=d, checkpoint_every=EVERY)
    assert sorted(resumed) == [7, 8, 9, 10]
    states.update(resumed)
    resumed = {}
    res = _run(trainer, resumed, checkpoint_dir=d, checkpoint_every=EVERY)
    assert sorted(resumed) == [10, 11, 12]
    states.update(resumed)
    assert states == ref_states
    assert res == reference
    # a finished run re-run with the same folder trains nothing
    again = {}
    assert _run(trainer, again, checkpoint_dir=d) == reference and again == {}


def test_trainer_checkpoint_bad_inputs(trainer, tmp_path):
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match=r"train_one: checkpoint_every=.* must be a positive"):
            _run(trainer, {}, checkpoint_dir=tmp_path, checkpoint_every=bad)
    with pytest.raises(ValueError, match=r"train_one: checkpoint_every=3 needs a checkpoint_dir"):
        _run(trainer, {}, checkpoint_every=3)
    with pytest.raises(ValueError, match=r"checkpoint_every=-1 must be >= 0"):
        mtl_exp.run(dataclasses.replace(mtl_exp.PRESETS["tiny"], checkpoint_every=-1))
