"""Online EWC against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import losses


def _model(rng):
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=10).astype(np.int32)
    return params, x, y


def _nll(p, ex):
    z = ex["x"] @ p["w"] + p["b"]
    return -jax.nn.log_softmax(z)[ex["y"]]


def test_diagonal_fisher_matches_a_numpy_loop(rng):
    params, x, y = _model(rng)
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for xi, yi in zip(x, y, strict=True):
        z = xi @ w + b
        p = np.exp(z - z.max())
        p /= p.sum()
        dz = p - np.eye(3)[yi]  # d(-log p_y)/dz
        fw += np.outer(xi, dz) ** 2
        fb += dz**2
    got = losses.diagonal_fisher(_nll, params, {"x": x, "y": y}, chunk_size=3)
    np.testing.assert_allclose(got["w"], fw / 10, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["b"], fb / 10, rtol=1e-5, atol=1e-7)


def test_online_update_and_penalty(rng):
    params, _, _ = _model(rng)
    f1 = jax.tree.map(lambda x: jnp.asarray(rng.uniform(size=x.shape), jnp.float32), params)
    f2 = jax.tree.map(lambda x: jnp.asarray(rng.uniform(size=x.shape), jnp.float32), params)
    s1 = losses.ewc_next_task(None, params, f1)
    moved = jax.tree.map(lambda x: x + 0.5, params)
    s2 = losses.ewc_next_task(s1, moved, f2, gamma=0.9)
    np.testing.assert_allclose(s2.fisher["w"], 0.9 * f1["w"] + f2["w"], rtol=1e-6)
    np.testing.assert_array_equal(s2.anchor["w"], moved["w"])
    theta = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    want = (
        0.5
        * 3.0
        * sum(
            np.sum(np.asarray(s2.fisher[k]) * (np.asarray(theta[k]) - np.asarray(moved[k])) ** 2)
            for k in ("w", "b")
        )
    )
    got = jax.jit(lambda t: losses.ewc_penalty(t, s2, weight=3.0))(theta)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # gradient = weight * F * (theta - anchor); nothing flows into the state
    g = jax.grad(lambda t: losses.ewc_penalty(t, s2, weight=3.0))(theta)
    np.testing.assert_allclose(g["w"], 3.0 * s2.fisher["w"] * (theta["w"] - moved["w"]), rtol=1e-5)
    assert float(losses.ewc_penalty(s2.anchor, s2)) == 0.0


def test_bad_inputs(rng):
    params, x, y = _model(rng)
    s = losses.ewc_next_task(None, params, params)
    with pytest.raises(ValueError, match=r"weight=-1.0 must be >= 0"):
        losses.ewc_penalty(params, s, weight=-1.0)
    with pytest.raises(ValueError, match=r"gamma=1.5 must be in \[0, 1\]"):
        losses.ewc_next_task(s, params, params, gamma=1.5)
    with pytest.raises(ValueError, match=r"no examples"):
        losses.diagonal_fisher(_nll, params, {"x": x[:0], "y": y[:0]})
    with pytest.raises(ValueError, match=r"no leaf at path 'b'"):
        losses.ewc_next_task(None, params, {"w": params["w"]})
