"""Checkpoint and resume of ``atlas.fit``: a crashed fit resumes bit-identically.

A fit is "crashed" in-process by a progress wrapper that raises after a chosen number of
steps; re-running with the same folder must give the same best and final coefficients (bit
for bit), best epoch, score and history as an uninterrupted fit without checkpoints.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.checkpoint import tree_fingerprint
from cljax.merging import atlas
from tests.merging.test_atlas import _regression_problem

SPE, EPOCHS, EVERY = 5, 4, 3  # mid-epoch saves at 3, 6, 9, 12, 18; epoch ends at 5, 10, ...


class _Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def problem():
    params, tvs, _, apply, x, y = _regression_problem(np.random.default_rng(0))
    loss_fn = lambda p, batch, r: jnp.mean((apply(p, batch["x"]) - batch["y"]) ** 2)
    batch_at = lambda s: {"x": x[(s % 8) * 32 : (s % 8 + 1) * 32], "y": y[(s % 8) * 32 :][:32]}
    mse = jax.jit(lambda p: jnp.mean((apply(p, x) - y) ** 2))
    calls = {"evaluate": 0}

    def evaluate(p):
        calls["evaluate"] += 1
        return {"neg_mse": -mse(p)}

    kw = dict(
        epochs=EPOCHS,
        steps_per_epoch=SPE,
        optimizer=optax.adamw(0.05, weight_decay=0.1),
        evaluate=evaluate,
        score="neg_mse",
        seed=3,
    )
    return (loss_fn, params, tvs, batch_at), kw, calls


def _crash_after(n, starts):
    count = {"n": 0}

    def progress(it):
        starts.append(it.start)
        for s in it:
            yield s
            count["n"] += 1
            if count["n"] == n:
                raise _Crash(f"crash after {n} steps")

    return progress


def _fingerprint(res):
    return {
        "coefficients": tree_fingerprint(res.coefficients),
        "final": tree_fingerprint(res.final_coefficients),
        "best": (res.best_epoch, res.best_score),
        "history": res.history,
    }


def test_crashed_fit_resumes_bitwise(problem, tmp_path):
    args, kw, calls = problem
    reference = _fingerprint(atlas.fit(*args, **kw))
    d = tmp_path / "ckpt"
    run = lambda n=None, starts=None: atlas.fit(
        *args,
        **kw,
        checkpoint_dir=d,
        checkpoint_every=EVERY,
        progress=_crash_after(n, [] if starts is None else starts),
    )
    with pytest.raises(_Crash):  # after 7 steps: epoch 2, saved at 6
        run(7)
    starts = []
    with pytest.raises(_Crash):  # resumes at step 6; crashes after step 14 (saved at 12)
        run(8, starts)
    assert starts[0] == 6
    shutil.copytree(d, tmp_path / "copy")
    starts = []
    res = run(None, starts)
    assert starts == [12, 15]
    assert _fingerprint(res) == reference
    # a corrupt newest checkpoint is named, the previous one is used, and then replaced
    (tmp_path / "copy" / "step_12" / "manifest.json").write_text("{")
    starts = []
    with pytest.warns(UserWarning, match=r"step_12"):
        res = atlas.fit(
            *args,
            **kw,
            checkpoint_dir=tmp_path / "copy",
            checkpoint_every=EVERY,  # saves step 12 again, over the corrupt one
            progress=_crash_after(None, starts),
        )
    assert starts == [10, 15] and _fingerprint(res) == reference
    # a finished fit re-run with the same folder only reloads: no step, no evaluation
    before, starts = calls["evaluate"], []
    again = run(None, starts)
    assert starts == [] and calls["evaluate"] == before
    assert _fingerprint(again) == reference


def test_stopped_fit_stays_stopped(problem, tmp_path):
    args, kw, _ = problem
    kw = {**kw, "stop": lambda m: True, "checkpoint_dir": tmp_path}  # stops after epoch 1
    first = atlas.fit(*args, **kw)
    assert len(first.history) == 2
    starts = []
    again = atlas.fit(*args, **kw, progress=_crash_after(None, starts))
    assert starts == [] and _fingerprint(again) == _fingerprint(first)


def test_fit_checkpoint_bad_inputs(problem, tmp_path):
    args, kw, _ = problem
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"fit: checkpoint_every=.* must be a positive int"):
            atlas.fit(*args, **kw, checkpoint_dir=tmp_path, checkpoint_every=bad)
    with pytest.raises(ValueError, match=r"fit: checkpoint_every=2 needs a checkpoint_dir"):
        atlas.fit(*args, **kw, checkpoint_every=2)
    atlas.fit(*args, **{**kw, "epochs": 1}, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"fit: checkpoint in .* is of another fit"):
        atlas.fit(*args, **{**kw, "steps_per_epoch": SPE + 1}, checkpoint_dir=tmp_path)
