"""Logit-swap self-distillation against a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import losses


def _np_loss(s, t, y, temp, mask=None):
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        if mask is not None and not mask[i]:
            continue
        ti = t[i].copy()
        top = int(np.argmax(ti))
        if top != y[i]:
            ti[top], ti[y[i]] = ti[y[i]], ti[top]
        p = np.exp(ti / temp - (ti / temp).max())
        p /= p.sum()
        lq = s[i] / temp - (s[i] / temp).max()
        lq -= np.log(np.exp(lq).sum())
        total += float(np.sum(p * (np.log(p) - lq)))
        count += 1
    return total / max(count, 1)


def test_swap_hand_worked():
    t = jnp.array([[1.0, 5.0, 2.0], [4.0, 0.0, 3.0]])
    got = losses.swap_top_logit(t, jnp.array([2, 0]))
    np.testing.assert_array_equal(got, [[1.0, 2.0, 5.0], [4.0, 0.0, 3.0]])


def test_matches_numpy_loop(rng):
    s = rng.normal(size=(12, 6)).astype(np.float32)
    t = (rng.normal(size=(12, 6)) * 2).astype(np.float32)
    y = rng.integers(0, 6, size=12)
    f = jax.jit(lambda a, b, c: losses.logit_swap_distillation(a, b, c, temperature=2.0))
    assert float(f(s, t, y)) == pytest.approx(_np_loss(s, t, y, 2.0), rel=1e-5)
    mask = rng.random(12) > 0.4
    y_pad = np.where(mask, y, -100)
    got = losses.logit_swap_distillation(s, t, y_pad, where=mask, temperature=1.0)
    assert float(got) == pytest.approx(_np_loss(s, t, y, 1.0, mask), rel=1e-5)
    t2 = losses.logit_swap_distillation(s, t, y, temperature=3.0, scale_by_t2=True)
    assert float(t2) == pytest.approx(9 * _np_loss(s, t, y, 3.0), rel=1e-5)
    # leading axes [B, L, V]
    got = losses.logit_swap_distillation(s.reshape(3, 4, 6), t.reshape(3, 4, 6), y.reshape(3, 4))
    assert float(got) == pytest.approx(_np_loss(s, t, y, 1.0), rel=1e-5)


def test_minimum_at_swapped_teacher_and_no_teacher_gradient(rng):
    t = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=5))
    target = losses.swap_top_logit(t, y)
    g = jax.grad(lambda s: losses.logit_swap_distillation(s, t, y))(target)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
    assert np.all(np.argmax(target, -1) == np.asarray(y))
    gt = jax.grad(lambda tt: losses.logit_swap_distillation(t, tt, y))(t + 1.0)
    np.testing.assert_array_equal(gt, 0.0)


def test_bad_inputs():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"temperature=0.0 must be > 0"):
        losses.logit_swap_distillation(x, x, jnp.zeros(2, int), temperature=0.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"logit_swap_distillation: temperature=.* finite"):
            losses.logit_swap_distillation(x, x, jnp.zeros(2, int), temperature=bad)
    with pytest.raises(ValueError, match=r"differ in shape"):
        losses.logit_swap_distillation(x, jnp.ones((2, 4)), jnp.zeros(2, int))
    with pytest.raises(ValueError, match=r"labels \(3,\) must have shape \(2,\)"):
        losses.logit_swap_distillation(x, x, jnp.zeros(3, int))


def test_docs_page_code_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "logit-swap.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/logit-swap.md", "exec"), {})
