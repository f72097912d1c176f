"""Damaged checkpoints and non-finite values in the continual runner.

A run crashed mid-task (a boundary checkpoint and a mid-task one on disk) or finished (two
boundary checkpoints) has one of its checkpoints damaged -- each kind of damage of
``tests/test_checkpoint.py`` -- and is re-run with the same folder: it must name the damaged
checkpoint, move it aside, fall back to the previous good state (or start over) and end
bit-identical to an uninterrupted run, and a second re-run must load the result.
"""

import shutil

import numpy as np
import optax
import pytest

from cljax import continual as cl
from cljax.data import Task
from cljax.train import NonFiniteError
from tests.continual.test_runner import _setup, _tasks
from tests.continual.test_runner_resume import _Crash, _crash_after, _fingerprint
from tests.test_checkpoint import DAMAGE

SPT, EVERY = 10, 4  # mid-task checkpoints at global steps 4, 8 (task 0), 12, 16 (task 1)
KINDS = [
    "truncate array file",
    "flip array byte",
    "delete array file",
    "delete manifest",
    "truncate manifest",
    "unseen: delete array files",
]


@pytest.fixture(scope="module")
def setup():
    _, params, apply_fn = _setup(2)
    kw = dict(
        apply_fn=apply_fn,
        params=params,
        optimizer=optax.adam(1e-2),
        steps_per_task=SPT,
        batch_size=16,
        evaluate_initial=True,
        seed=3,
    )
    return _tasks(2), kw


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """The reference fingerprint, a crashed folder (after global step 14), a finished one."""
    tasks, kw = setup
    reference = _fingerprint(cl.run_sequence(tasks, **kw, methods=[cl.lwf(weight=0.5)]))
    root = tmp_path_factory.mktemp("runs")
    with pytest.raises(_Crash):
        _run(setup, root / "crashed", crash=14)
    assert [p.name for p in (root / "crashed" / "mid_task").glob("step_*")] == ["step_12"]
    _run(setup, root / "finished")
    return reference, root


def _run(setup, d, crash=None, seen=None):
    tasks, kw = setup
    return cl.run_sequence(
        tasks,
        **kw,
        methods=[cl.lwf(weight=0.5)],
        checkpoint_dir=d,
        checkpoint_every=EVERY,
        progress=_crash_after(crash, [] if seen is None else seen),
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoint_resumes_identically(setup, runs, tmp_path, kind):
    reference, root = runs
    # the mid-task checkpoint of a crashed run: back to the boundary after task 0
    d = tmp_path / "crashed"
    shutil.copytree(root / "crashed", d)
    DAMAGE[kind](d / "mid_task" / "step_12")
    seen = []
    with pytest.warns(UserWarning, match=r"mid_task/step_12.*moved .* aside"):
        res = _run(setup, d, seen=seen)
    assert seen == [("task 1", SPT)] and (res.resumed_from, res.resumed_at_step) == (1, 0)
    assert _fingerprint(res) == reference
    assert (d / "mid_task" / ".corrupt-12").is_dir()
    # the last boundary of a finished run: task 1 again, its checkpoint written anew
    d = tmp_path / "finished"
    shutil.copytree(root / "finished", d)
    DAMAGE[kind](d / "step_2")
    with pytest.warns(UserWarning, match=r"step_2.*moved .* aside"):
        res = _run(setup, d)
    assert _fingerprint(res) == reference
    seen = []
    res = _run(setup, d, seen=seen)  # and now it only loads
    assert seen == [] and _fingerprint(res) == reference


@pytest.mark.slow
def test_every_checkpoint_damaged_starts_over(setup, runs, tmp_path):
    reference, root = runs
    d = tmp_path / "crashed"
    shutil.copytree(root / "crashed", d)
    DAMAGE["flip array byte"](d / "step_1")
    DAMAGE["delete manifest"](d / "mid_task" / "step_12")
    seen = []
    with pytest.warns(UserWarning, match=r"step_1"):
        res = _run(setup, d, seen=seen)
    assert seen[0] == ("task 0", SPT) and res.resumed_from == 0
    assert _fingerprint(res) == reference


# ------------------------------------------------------------------------ non-finite values


def _poisoned(tasks, i, row=5):
    t = tasks[i]
    x = t.x_train.copy()
    x[row] = np.nan
    return [
        *tasks[:i],
        Task(t.name, t.classes, x, t.y_train, t.x_val, t.y_val, t.x_test, t.y_test),
        *tasks[i + 1 :],
    ]


def _bad_steps(task, kw, i, row=5):
    """Steps of task ``i`` whose batch holds the poisoned row (independent of the runner)."""
    seed = kw["seed"] * 1000 + i
    return [
        s
        for s in range(kw["steps_per_task"])
        if np.isnan(task.batch_at(s, kw["batch_size"], seed=seed)["x"]).any()
    ]


@pytest.mark.slow
def test_nonfinite_raises_naming_step_and_task_and_checkpoints_nothing(setup, tmp_path):
    tasks, kw = setup
    tasks = _poisoned(tasks, 1)
    bad = _bad_steps(tasks[1], kw, 1)
    assert bad, "the poisoned row should be drawn in task 1"
    with pytest.raises(NonFiniteError, match=rf"step {bad[0]} of task 1 \('t1'\)"):
        cl.run_sequence(tasks, **kw, checkpoint_dir=tmp_path, checkpoint_every=EVERY)
    # task 0's boundary and its mid-task checkpoints only; nothing after the bad step
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_1"]
    mids = sorted(int(p.name[5:]) for p in (tmp_path / "mid_task").glob("step_*"))
    assert all(m <= SPT + bad[0] for m in mids), mids
    with pytest.raises(ValueError, match=r"nonfinite='apply' must be one of"):
        cl.run_sequence(tasks, **kw, nonfinite="apply")


def test_nonfinite_skip_counts_and_keeps_the_state_finite(setup):
    tasks, kw = setup
    tasks = _poisoned(tasks, 1)
    bad = _bad_steps(tasks[1], kw, 1)
    res = cl.run_sequence(tasks, **kw, nonfinite="skip")
    assert res.skipped == len(bad) == int(res.state.skipped) and res.skipped > 0
    assert cl._runner._nonfinite_leaf(res.state.params) is None
    assert np.isfinite(res.losses).all() and np.isfinite(res.accuracy).all()


@pytest.mark.slow
def test_huge_learning_rate_raises(setup):
    tasks, kw = setup
    with pytest.raises(NonFiniteError, match=r"of task 0 \('t0'\)"):
        cl.run_sequence(tasks, **{**kw, "optimizer": optax.sgd(1e30)})


@pytest.mark.slow
def test_nonfinite_hook_state_raises(setup):
    import jax
    import jax.numpy as jnp

    def poison(state, ctx):
        return state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))

    tasks, kw = setup
    with pytest.raises(NonFiniteError, match=r"end_task hooks of task 0 \('t0'\)"):
        cl.run_sequence(
            tasks, **kw, methods=[cl.Method(end_task=poison, name="poison")], nonfinite="skip"
        )
