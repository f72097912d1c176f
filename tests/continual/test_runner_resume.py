"""Mid-task checkpoints of the continual runner: a crashed run resumes bit-identically.

A run is "crashed" in-process by a progress wrapper that raises after a chosen global step
(after that step and its checkpoint, if any); re-running with the same folder must end
with the accuracy matrix, losses and every leaf of the train state (parameters, optimiser
state with CoSO's sketch and history, LwF's frozen model, PRNG key) equal bit
for bit to an uninterrupted run without checkpoints.
"""

import optax
import pytest

from cljax import continual as cl
from cljax.checkpoint import tree_fingerprint
from tests.continual.test_runner import _setup, _tasks

SPT = 20  # steps per task; the mean loss of the last 2 steps of each task is reported
EVERY = 13  # checkpoint interval (global steps): task 0 saves at 13; task 1 at 26 and 39


class _Crash(RuntimeError):
    pass


def _crash_after(step: int | None, seen: list):
    """A ``progress`` wrapper raising once its run's ``step``-th optimiser step is done."""
    count = {"n": 0}

    def progress(it, desc, total):
        seen.append((desc, total))
        for s in it:
            yield s
            count["n"] += 1
            if count["n"] == step:
                raise _Crash(f"crash after step {step}")

    return progress


def _methods():
    return [
        cl.coso(1e-2, [("Dense_0/kernel", True)], proj_rank=2, sketch_rank=4),
        cl.lwf(weight=0.5),
    ]


@pytest.fixture(scope="module")
def setup():
    tasks = _tasks(2)
    _, params, apply_fn = _setup(2)
    kw = dict(
        apply_fn=apply_fn,
        params=params,
        optimizer=optax.adam(1e-2),
        steps_per_task=SPT,
        batch_size=16,
        scenario="domain",
        evaluate_initial=True,
        seed=5,
    )
    return tasks, kw


def _fingerprint(res):
    return {
        "accuracy": res.accuracy.tolist(),
        "initial": res.initial.tolist(),
        "losses": res.losses,
        "state": tree_fingerprint(
            {"params": res.state.params, "opt": res.state.opt_state, "m": res.state.methods}
        ),
        "rng": tree_fingerprint(res.state.key),
        "step": int(res.state.step),
    }


def _run(setup, d, crash=None, seen=None):
    tasks, kw = setup
    return cl.run_sequence(
        tasks,
        **kw,
        methods=_methods(),
        checkpoint_dir=d,
        checkpoint_every=EVERY,
        progress=_crash_after(crash, [] if seen is None else seen),
    )


@pytest.mark.slow
def test_crashes_mid_task_resume_bitwise(setup, tmp_path):
    tasks, kw = setup
    reference = _fingerprint(cl.run_sequence(tasks, **kw, methods=_methods()))
    d = tmp_path / "ckpt"
    with pytest.raises(_Crash):  # after global step 39: task 1, step 19 (saved, with the loss tail)
        _run(setup, d, crash=39)
    assert sorted(p.name for p in (d / "mid_task").glob("step_*")) == ["step_26", "step_39"]
    # a checkpoint of another run in the folder is refused, naming what differs
    with pytest.raises(ValueError, match=r"mid-task checkpoint in .* is of another run"):
        cl.run_sequence(
            tasks,
            **{**kw, "steps_per_task": SPT + 1},
            methods=_methods(),
            checkpoint_dir=d,
            checkpoint_every=EVERY,
        )
    seen = []
    res = _run(setup, d, seen=seen)  # one step left in task 1, with the loss tail restored
    assert seen == [("task 1", 1)] and (res.resumed_from, res.resumed_at_step) == (1, 19)
    assert _fingerprint(res) == reference
    assert res.metrics == cl.summarize(res.accuracy, baseline=res.initial)
    # mid-task checkpoints are cleared at each boundary; boundary checkpoints stay
    assert not list((d / "mid_task").glob("step_*"))
    assert sorted(p.name for p in d.glob("step_*")) == ["step_1", "step_2"]


def test_checkpoint_every_bad_inputs(setup, tmp_path):
    tasks, kw = setup
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match=r"checkpoint_every=.* must be a positive int"):
            cl.run_sequence(tasks, **kw, checkpoint_dir=tmp_path, checkpoint_every=bad)
    with pytest.raises(ValueError, match=r"checkpoint_every=4 needs a checkpoint_dir"):
        cl.run_sequence(tasks, **kw, checkpoint_every=4)
