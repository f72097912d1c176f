"""EMA against a slow float64 loop, with and without bias correction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.averaging import ema


def _trajectory(rng, steps, shape=(3, 2)):
    return [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]


def _loop_ema(p0, traj, decay, debias):
    """Textbook forms: copy-started EMA, or zero-started EMA divided by 1 - decay^t."""
    if debias:
        acc = np.zeros_like(p0, dtype=np.float64)
        for p in traj:
            acc = decay * acc + (1 - decay) * p.astype(np.float64)
        return acc / (1 - decay ** len(traj))
    m = p0.astype(np.float64)
    for p in traj:
        m = decay * m + (1 - decay) * p.astype(np.float64)
    return m


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_matches_loop(rng, decay, debias):
    p0 = rng.normal(size=(3, 2)).astype(np.float32)
    traj = _trajectory(rng, 25)
    avg = ema(decay=decay, debias=debias)
    update = jax.jit(avg.update)
    state = avg.init({"w": p0})
    for t, p in enumerate(traj, start=1):
        _, state = update({"w": p}, state, step=t)
    np.testing.assert_allclose(state.mean["w"], _loop_ema(p0, traj, decay, debias), rtol=1e-5)
    assert int(state.count) == len(traj)


def test_bias_correction_first_update_is_the_params_and_forgets_init(rng):
    p0, p1 = rng.normal(size=(2, 4)).astype(np.float32)
    avg = ema(decay=0.999, debias=True)
    _, state = avg.update({"w": p1}, avg.init({"w": p0}))
    np.testing.assert_array_equal(state.mean["w"], p1)
    # without correction the initial weights dominate
    _, plain = ema(decay=0.999).update({"w": p1}, ema(decay=0.999).init({"w": p0}))
    np.testing.assert_allclose(plain.mean["w"], 0.999 * p0 + 0.001 * p1, rtol=1e-5)


def test_bias_correction_accurate_for_decay_near_one(rng):
    # 1 - d^t by cancellation loses ~3 digits at d = 0.9999 in float32; expm1 does not.
    traj = _trajectory(rng, 5, shape=(16,))
    avg = ema(decay=0.9999, debias=True)
    state = avg.init({"w": np.zeros(16, np.float32)})
    for t, p in enumerate(traj, start=1):
        _, state = avg.update({"w": p}, state, step=t)
    want = _loop_ema(np.zeros(16), traj, 0.9999, True)
    np.testing.assert_allclose(state.mean["w"], want, rtol=2e-5, atol=1e-6)


def test_half_precision_accumulates_in_float32(rng):
    p = {"w": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16), "n": jnp.arange(3)}
    avg = ema(decay=0.9)
    state = avg.init(p)
    assert state.mean["w"].dtype == jnp.float32
    assert state.mean["n"].dtype == p["n"].dtype
    new = {"w": (p["w"] + 1).astype(jnp.bfloat16), "n": p["n"] + 7}
    mean, state = avg.update(new, state)
    assert mean is state.mean  # the output is the new average
    want = 0.9 * np.asarray(p["w"], np.float64) + 0.1 * np.asarray(new["w"], np.float64)
    np.testing.assert_allclose(state.mean["w"], want, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(state.mean["n"], p["n"] + 7)  # non-float leaves: latest


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match=r"decay=.* must be in \[0, 1\)"):
        ema(decay=decay)
