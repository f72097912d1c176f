import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mtl_reference import flat, min_norm_qp

from cljax.mtl import mgda
from cljax.mtl._simplex import min_norm_weights, project_simplex


def _case(rng, t, d, shift):
    return {
        "a": jnp.asarray(rng.normal(size=(t, d)) + shift, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(t, 2, 3)), jnp.float32),
    }


CASES = [(2, 4, 0.0), (3, 6, 0.3), (5, 10, 0.5), (8, 20, 1.0), (6, 3, 0.0), (4, 30, -0.2)]


@pytest.mark.slow
@pytest.mark.parametrize("t,d,shift", CASES)
def test_matches_exact_qp(rng, t, d, shift):
    g = _case(rng, t, d, shift)
    gs = flat(g)
    ref = min_norm_qp(gs @ gs.T) @ gs
    out = flat(jax.tree.map(lambda x: x[None], jax.jit(mgda)(g)))[0]
    scale = np.abs(gs).max()
    np.testing.assert_allclose(out, ref, atol=2e-5 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("t,d,shift", CASES)
def test_min_norm_optimality_conditions(rng, t, d, shift):
    g = _case(rng, t, d, shift)
    gs = flat(g)
    gram = gs @ gs.T
    w = np.asarray(min_norm_weights(jnp.asarray(gram, jnp.float32)), np.float64)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    # KKT: <g_j, d> >= ||d||^2 for every j, with equality on the support.
    dd = w @ gram @ w
    slack = gram @ w - dd
    tol = 1e-4 * np.abs(gram).max()
    assert np.all(slack >= -tol)
    assert np.all(np.abs(slack[w > 1e-4]) <= tol)


def test_identical_gradients_return_the_gradient(rng):
    g0 = rng.normal(size=7)
    g = {"w": jnp.asarray(np.stack([g0] * 3), jnp.float32)}
    np.testing.assert_allclose(mgda(g)["w"], g0, rtol=1e-5, atol=1e-6)
    n = np.linalg.norm(g0)
    np.testing.assert_allclose(mgda(g, normalize=True)["w"], 3 * g0 / n, rtol=1e-5, atol=1e-6)


def test_opposite_gradients_give_zero():
    g = {"w": jnp.array([[1.0, 2.0], [-1.0, -2.0]])}
    np.testing.assert_allclose(mgda(g)["w"], 0.0, atol=1e-6)


def test_normalize_weights(rng):
    g = _case(rng, 3, 5, 0.5)
    gs = flat(g)
    n = np.linalg.norm(gs, axis=1)
    u = gs / n[:, None]
    ref = 3 * min_norm_qp(u @ u.T) @ u
    out = flat(jax.tree.map(lambda x: x[None], mgda(g, normalize=True)))[0]
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_project_simplex_against_sorting_free_reference(rng):
    for _ in range(5):
        v = rng.normal(size=6) * 3
        p = np.asarray(project_simplex(jnp.asarray(v)))
        # Reference: bisection on the threshold.
        lo, hi = v.min() - 1, v.max()
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
        np.testing.assert_allclose(p, np.maximum(v - lo, 0), atol=1e-5)


def test_needs_two_tasks():
    with pytest.raises(ValueError, match="mgda: got T=1 .* needs T >= 2"):
        mgda({"w": jnp.ones((1, 3))})


def test_two_tasks_closed_form_matches_exact_qp(rng):
    """T = 2 takes the closed form: interior, clipped at either end, parallel, one zero."""
    g1 = rng.normal(size=6)
    cases = [
        np.stack([g1, rng.normal(size=6)]),  # generic
        np.stack([g1, 3.0 * g1]),  # parallel, one longer: all weight on the shorter (w = [1, 0])
        np.stack([4.0 * g1, g1 + 0.01 * rng.normal(size=6)]),  # clipped at the other end
        np.stack([g1, np.zeros(6)]),  # one zero gradient: the min-norm point is 0
    ]
    for gs in cases:
        gram = gs @ gs.T
        w = np.asarray(min_norm_weights(jnp.asarray(gram, jnp.float32)), np.float64)
        ref = min_norm_qp(gram)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-6
        np.testing.assert_allclose(w @ gs, ref @ gs, atol=1e-5 * np.abs(gs).max())
