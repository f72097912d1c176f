import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mtl_reference import flat
from _mtl_reference import imtl_g as imtl_ref

from cljax.mtl import imtl_g


@pytest.mark.parametrize("t", [2, 3, 6])
def test_matches_reference_and_equal_projections(rng, t):
    g = {"a": jnp.asarray(rng.normal(size=(t, 10)) * rng.uniform(0.5, 3, (t, 1)), jnp.float32)}
    gs = flat(g)
    out = np.asarray(jax.jit(imtl_g)(g)["a"], np.float64)
    np.testing.assert_allclose(out, imtl_ref(gs), rtol=1e-4, atol=1e-4)
    u = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    proj = u @ out
    np.testing.assert_allclose(proj, proj[0], rtol=1e-3, atol=1e-4)


def test_identical_gradients(rng):
    g0 = rng.normal(size=5)
    g = {"a": jnp.asarray(np.stack([g0] * 3), jnp.float32)}
    np.testing.assert_allclose(imtl_g(g)["a"], g0, rtol=1e-5, atol=1e-6)


def test_needs_two_tasks():
    with pytest.raises(ValueError, match="imtl_g: got T=1"):
        imtl_g({"a": jnp.ones((1, 3))})
