import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mtl_reference import cagrad as cagrad_ref
from _mtl_reference import flat

from cljax.mtl import cagrad
from cljax.mtl._cagrad import _two_task_dual, cagrad_weights


@pytest.mark.slow
@pytest.mark.parametrize("t,shift,c", [(2, 0.0, 0.4), (3, 0.3, 0.4), (5, 0.5, 0.8), (8, 0.2, 0.4)])
def test_matches_scipy_reference(rng, t, shift, c):
    g = {"a": jnp.asarray(rng.normal(size=(t, 12)) + shift, jnp.float32)}
    gs = flat(g)
    ref, _, obj = cagrad_ref(gs, c)
    out = np.asarray(jax.jit(lambda g: cagrad(g, c=c))(g)["a"])
    # Our dual objective is at least as low as SLSQP's, and the directions agree.
    w = np.asarray(cagrad_weights(jnp.asarray(gs @ gs.T, jnp.float32), c=c, rescale=False))
    np.testing.assert_allclose(out, ref, atol=2e-3 * np.abs(ref).max())
    assert np.isfinite(w).all()
    del obj


def test_c_zero_is_the_mean(rng):
    g = {"a": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}
    np.testing.assert_allclose(cagrad(g, c=0.0)["a"], flat(g).mean(0), rtol=1e-5, atol=1e-6)


def test_identical_gradients(rng):
    g0 = rng.normal(size=5)
    g = {"a": jnp.asarray(np.stack([g0] * 3), jnp.float32)}
    c = 0.4
    np.testing.assert_allclose(cagrad(g, c=c)["a"], (1 + c) / (1 + c * c) * g0, rtol=1e-4)
    np.testing.assert_allclose(cagrad(g, c=c, rescale=False)["a"], (1 + c) * g0, rtol=1e-4)


def test_improves_worst_task_over_the_mean(rng):
    g = {"a": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)}
    gs = flat(g)
    d = np.asarray(cagrad(g, c=0.5, rescale=False)["a"], np.float64)
    assert (gs @ d).min() >= (gs @ gs.mean(0)).min() - 1e-5


def test_bad_inputs():
    with pytest.raises(ValueError, match="cagrad: c=-0.1 must be >= 0"):
        cagrad({"a": jnp.ones((2, 3))}, c=-0.1)
    with pytest.raises(ValueError, match="needs T >= 2"):
        cagrad({"a": jnp.ones((1, 3))})


@pytest.mark.parametrize("c", [0.1, 0.4, 0.8])
def test_two_task_dual_matches_brute_force(rng, c):
    """T = 2 solves the dual without iterations: its objective equals a dense float64 search."""
    g1 = rng.normal(size=9)
    cases = [
        np.stack([g1, rng.normal(size=9)]),  # generic
        np.stack([g1, -0.8 * g1 + 0.1 * rng.normal(size=9)]),  # strongly conflicting
        np.stack([g1, 2.0 * g1]),  # parallel: A r^2 - D^2 degenerate
        np.stack([g1, g1]),  # identical: q constant
    ]
    grid = np.linspace(0.0, 1.0, 200_001)
    for gs in cases:
        gram = gs @ gs.T
        s = gram.diagonal().max()
        gn = gram / s
        gb = gn @ np.full(2, 0.5)
        r = c * np.sqrt(0.5 * gb.sum())
        w = np.stack([grid, 1.0 - grid], 1)
        f = w @ gb + r * np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", w, gn, w), 0.0))
        got = np.asarray(
            cagrad_weights(jnp.asarray(gram, jnp.float32), c=c, rescale=False), np.float64
        )
        as32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        gamma = float(_two_task_dual(as32(gn), as32(gb), as32(r))[0])
        wd = np.array([gamma, 1.0 - gamma])
        fw = wd @ gb + r * np.sqrt(max(wd @ gn @ wd, 0.0))
        assert fw <= f.min() + 1e-6 * max(1.0, abs(f.min()))
        assert np.isfinite(got).all()
