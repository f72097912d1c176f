"""DANN's gradient reversal, schedule and domain loss against numpy and finite differences."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import losses


def _fd_grad(f, x, eps=1e-3):
    """Central finite differences of a scalar function of a float64 numpy vector."""
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def test_forward_is_identity_on_arrays_and_trees(rng):
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    np.testing.assert_array_equal(losses.grad_reverse(x, 0.7), x)
    tree = {"a": x, "b": jnp.ones(2, jnp.bfloat16)}
    out = losses.grad_reverse(tree, 2.0)
    chex.assert_trees_all_equal(out, tree)
    chex.assert_trees_all_equal_dtypes(out, tree)


@pytest.mark.parametrize("scale", [1.0, 0.3, 2.5, 0.0])
def test_gradient_is_minus_scale_times_cotangent(rng, scale):
    w = rng.normal(size=5)
    x = rng.normal(size=5).astype(np.float32)
    # loss(x) = sum(w * tanh(r(x)))^2; r is the identity forward, so the reversed gradient is
    # -scale times the finite-difference gradient of the same expression without r
    plain = lambda v: float(np.sum(w * np.tanh(v)) ** 2)
    f = lambda v, s: jnp.sum(jnp.asarray(w, jnp.float32) * jnp.tanh(losses.grad_reverse(v, s))) ** 2
    got = jax.jit(jax.grad(f))(jnp.asarray(x), scale)
    want = -scale * _fd_grad(plain, x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)
    # and equal to jax.grad of -scale * x passed through the same head
    ref = jax.grad(lambda v: jnp.sum(jnp.asarray(w, jnp.float32) * jnp.tanh(v)) ** 2)(x)
    np.testing.assert_allclose(got, -scale * np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_scale_zero_stops_the_gradient_and_scale_gets_none(rng):
    x = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    g = jax.grad(lambda v: jnp.sum(losses.grad_reverse(v, 0.0) ** 2))(x)
    np.testing.assert_array_equal(g, 0.0)
    gs = jax.grad(lambda s: jnp.sum(losses.grad_reverse(x, s) ** 2))(0.5)
    assert float(gs) == 0.0


@pytest.mark.slow
def test_traced_scale_from_schedule_under_jit_and_vmap(rng):
    sched = losses.dann_schedule(100)
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)

    @jax.jit
    def per_step(step, v):
        return jax.grad(lambda u: jnp.sum(losses.grad_reverse(u, sched(step)) ** 2))(v)

    for step in (0, 37, 100):
        np.testing.assert_allclose(per_step(step, x), -float(sched(step)) * 2 * x, rtol=1e-6)
    # vmap over examples and over per-example scales
    scales = jnp.linspace(0.0, 2.0, 6)
    g = jax.vmap(jax.grad(lambda u, s: jnp.sum(losses.grad_reverse(u, s) ** 3)))(x, scales)
    np.testing.assert_allclose(g, -scales[:, None] * 3 * x**2, rtol=1e-6)


def test_gradient_keeps_dtype():
    x = jnp.ones(3, jnp.bfloat16)
    g = jax.grad(lambda v: jnp.sum(losses.grad_reverse(v, 0.5).astype(jnp.float32)))(x)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(g.astype(jnp.float32), -0.5)


def test_schedule_matches_the_paper_formula():
    sched = losses.dann_schedule(1000, gamma=10.0)
    for step in (0, 1, 250, 500, 999, 1000, 5000):
        p = min(step / 1000, 1.0)
        want = 2 / (1 + math.exp(-10 * p)) - 1
        assert float(sched(step)) == pytest.approx(want, abs=1e-6)
    assert float(sched(-5)) == 0.0
    assert float(jax.jit(sched)(jnp.int32(500))) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert float(losses.dann_schedule(10, gamma=3.0)(5)) == pytest.approx(
        2 / (1 + math.exp(-1.5)) - 1, abs=1e-6
    )


def _np_bce(zs, zt):
    sig = lambda z: 1 / (1 + np.exp(-z))
    ls = np.mean([-np.log(1 - sig(z)) for z in zs])
    lt = np.mean([-np.log(sig(z)) for z in zt])
    return 0.5 * (ls + lt)


def test_domain_loss_matches_numpy(rng):
    zs = rng.normal(size=7)
    zt = rng.normal(size=5)
    got = jax.jit(losses.domain_adversarial_loss)(jnp.asarray(zs), jnp.asarray(zt[:, None]))
    assert float(got) == pytest.approx(_np_bce(zs, zt), rel=1e-5)
    # equal batch sizes: the plain mean of the binary cross-entropy over all examples
    zt = rng.normal(size=7)
    cat = np.concatenate([zs, zt])
    lab = np.concatenate([np.zeros(7), np.ones(7)])
    p = 1 / (1 + np.exp(-cat))
    plain = np.mean(-(lab * np.log(p) + (1 - lab) * np.log(1 - p)))
    assert float(losses.domain_adversarial_loss(zs, zt)) == pytest.approx(plain, rel=1e-5)
    # stable for large logits
    big = losses.domain_adversarial_loss(jnp.array([-200.0]), jnp.array([200.0]))
    assert float(big) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_adversarial_step_moves_features_against_the_domain_classifier(rng):
    """One step through grad_reverse: the head lowers the domain loss, the features raise it."""
    f_s = jnp.asarray(rng.normal(size=(8, 2)) + 1.0, jnp.float32)
    f_t = jnp.asarray(rng.normal(size=(8, 2)) - 1.0, jnp.float32)
    w = jnp.asarray([0.3, -0.2], jnp.float32)

    def loss(w, fs, ft):
        return losses.domain_adversarial_loss(
            losses.grad_reverse(fs, 1.0) @ w, losses.grad_reverse(ft, 1.0) @ w
        )

    gw, gs, gt = jax.grad(loss, argnums=(0, 1, 2))(w, f_s, f_t)
    lr = 0.1
    plain = lambda w, fs, ft: losses.domain_adversarial_loss(fs @ w, ft @ w)
    assert plain(w - lr * gw, f_s, f_t) < plain(w, f_s, f_t)
    assert plain(w, f_s - lr * gs, f_t - lr * gt) > plain(w, f_s, f_t)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"dann_schedule: total_steps=0 must be an integer >= 1"):
        losses.dann_schedule(0)
    with pytest.raises(ValueError, match=r"total_steps=10.0 must be an integer"):
        losses.dann_schedule(10.0)
    with pytest.raises(ValueError, match=r"dann_schedule: gamma=-1.0 must be > 0"):
        losses.dann_schedule(10, gamma=-1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"dann_schedule: gamma=.* must be finite"):
            losses.dann_schedule(10, gamma=bad)
        with pytest.raises(ValueError, match=r"grad_reverse: scale=.* must be finite"):
            losses.grad_reverse(jnp.ones(3), bad)
        with pytest.raises(ValueError, match=r"grad_reverse: scale=.* must be finite"):
            losses.grad_reverse(jnp.ones(3), jnp.float32(bad))
    with pytest.raises(ValueError, match=r"scale must be a scalar"):
        losses.grad_reverse(jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"domain_logits_source has shape \(2, 3\)"):
        losses.domain_adversarial_loss(jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"domain_logits_target has shape \(0,\)"):
        losses.domain_adversarial_loss(jnp.ones(2), jnp.ones(0))


@pytest.mark.slow
def test_docs_page_code_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "dann.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/dann.md", "exec"), {})
