import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mtl_reference import flat

from cljax.mtl import nash_mtl
from cljax.mtl._nash import nash_mtl_weights


@pytest.mark.slow
@pytest.mark.parametrize("t", [2, 3, 8])
def test_solves_the_bargaining_equations(rng, t):
    g = {"a": jnp.asarray(rng.normal(size=(t, 16)) * rng.uniform(0.2, 5, (t, 1)), jnp.float32)}
    gs = flat(g)
    gram = gs @ gs.T
    gn = gram / np.linalg.norm(gram)
    a = np.asarray(nash_mtl_weights(jnp.asarray(gram, jnp.float32)), np.float64)
    assert np.all(a > 0)
    np.testing.assert_allclose(a * (gn @ a), 1.0, rtol=1e-4)
    # Independent check with scipy's root finder.
    from scipy.optimize import fsolve

    ref = fsolve(lambda x: gn @ x - 1 / x, 1 / np.sqrt(np.diag(gn)), xtol=1e-12)
    np.testing.assert_allclose(a, ref, rtol=1e-4)
    out = np.asarray(jax.jit(nash_mtl)(g)["a"], np.float64)
    np.testing.assert_allclose(out, a @ gs, rtol=1e-4, atol=1e-4)


def test_identical_gradients_sum(rng):
    g0 = rng.normal(size=5)
    g = {"a": jnp.asarray(np.stack([g0] * 3), jnp.float32)}
    np.testing.assert_allclose(nash_mtl(g)["a"], 3 * g0, rtol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="nash_mtl: got T=1"):
        nash_mtl({"a": jnp.ones((1, 3))})
    with pytest.raises(ValueError, match="max_iters=0"):
        nash_mtl({"a": jnp.ones((2, 3))}, max_iters=0)
