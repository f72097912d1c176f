"""ZSCL's weight ensemble: the uniform mean of exactly the snapshots the reference takes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.averaging import weight_ensemble


def test_hand_case():
    # theta_start = 1; iterations 0..4 give 2, 4, 8, 16, 32; every=2 takes iterations 0, 2, 4.
    we = weight_ensemble(every=2)
    state = we.init({"w": jnp.asarray(1.0)})
    for i, w in enumerate([2.0, 4.0, 8.0, 16.0, 32.0]):
        _, state = we.update({"w": jnp.asarray(w)}, state, step=1000 + i)  # step is ignored
    assert float(state.mean["w"]) == pytest.approx((1 + 2 + 8 + 32) / 4)
    assert int(state.count) == 4 and int(state.iteration) == 5


def test_reference_schedule_has_twelve_members(rng):
    # MTIL: 1000 + 1 iterations, every=100 -> {start, 0, 100, ..., 1000}.
    we = weight_ensemble(every=100)
    start = rng.normal(size=(3,)).astype(np.float32)
    traj = rng.normal(size=(1001, 3)).astype(np.float32)
    update = jax.jit(we.update)
    state = we.init({"w": start})
    for i in range(1001):
        _, state = update({"w": traj[i]}, state, step=i + 1)
    members = np.concatenate([start[None], traj[::100]])
    assert members.shape[0] == 12 == int(state.count)
    np.testing.assert_allclose(state.mean["w"], members.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every", [0, -3, 1.5, True])
def test_bad_every(every):
    with pytest.raises(ValueError, match="every=.* must be an integer >= 1"):
        weight_ensemble(every=every)
