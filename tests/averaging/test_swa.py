"""SWA against a slow loop over the update counts."""

import jax
import numpy as np
import pytest

from cljax.averaging import swa


@pytest.mark.parametrize(("start", "every"), [(0, 1), (3, 1), (4, 3), (0, 5)])
def test_matches_loop(rng, start, every):
    p0 = rng.normal(size=(5,)).astype(np.float32)
    traj = [rng.normal(size=(5,)).astype(np.float32) for _ in range(17)]
    avg = swa(start=start, every=every)
    update = jax.jit(avg.update)
    state = avg.init({"w": p0})
    taken = []
    for s, p in enumerate(traj, start=1):  # s = TrainState.step after update s
        _, state = update({"w": p}, state, step=s)
        if s >= start and (s - start) % every == 0:
            taken.append(p.astype(np.float64))
    assert int(state.count) == len(taken) > 0
    np.testing.assert_allclose(state.mean["w"], np.mean(taken, axis=0), rtol=1e-5, atol=1e-6)


def test_before_start_keeps_init(rng):
    p0, p1 = rng.normal(size=(2, 3)).astype(np.float32)
    avg = swa(start=10)
    _, state = avg.update({"w": p1}, avg.init({"w": p0}), step=9)
    np.testing.assert_array_equal(state.mean["w"], p0)
    assert int(state.count) == 0


@pytest.mark.parametrize(("kw", "msg"), [({"start": -1}, "start=-1"), ({"every": 0}, "every=0")])
def test_bad_hyperparameters(kw, msg):
    with pytest.raises(ValueError, match=msg):
        swa(**kw)


def test_update_without_step_names_it():
    avg = swa(start=0)
    with pytest.raises(ValueError, match=r"swa: update needs step="):
        avg.update({"w": np.ones(2)}, avg.init({"w": np.zeros(2)}))
