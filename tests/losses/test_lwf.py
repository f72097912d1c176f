"""LwF distillation against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import losses


def _np_kd(s, t, temp, cols=None):
    if cols is not None:
        s, t = s[:, cols], t[:, cols]
    s, t = s / temp, t / temp
    p = np.exp(t - t.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    logq = s - s.max(1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(1, keepdims=True))
    return np.mean(-(p * logq).sum(1))


def test_matches_numpy(rng):
    s = rng.normal(size=(6, 5)).astype(np.float32)
    t = rng.normal(size=(6, 5)).astype(np.float32)
    got = jax.jit(lambda a, b: losses.lwf_distillation(a, b, temperature=2.0))(s, t)
    assert float(got) == pytest.approx(_np_kd(s, t, 2.0), rel=1e-5)
    t2 = losses.lwf_distillation(s, t, temperature=3.0, scale_by_t2=True)
    assert float(t2) == pytest.approx(9.0 * _np_kd(s, t, 3.0), rel=1e-5)
    mask = np.array([True, False, True, True, False])
    m = losses.lwf_distillation(s, t, where=mask)
    assert float(m) == pytest.approx(_np_kd(s, t, 2.0, cols=mask), rel=1e-5)


def test_minimum_at_the_teacher_and_no_teacher_gradient(rng):
    t = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    g = jax.grad(lambda s: losses.lwf_distillation(s, t))(t)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
    gt = jax.grad(lambda tt: losses.lwf_distillation(t + 1.0, tt))(t)
    np.testing.assert_array_equal(gt, 0.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"temperature=0.0 must be > 0"):
        losses.lwf_distillation(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0.0)
    with pytest.raises(ValueError, match=r"differ in shape"):
        losses.lwf_distillation(jnp.ones((2, 3)), jnp.ones((2, 4)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_temperature_rejected(bad):
    with pytest.raises(ValueError, match=r"lwf_distillation: temperature=.* must be finite"):
        losses.lwf_distillation(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=bad)
