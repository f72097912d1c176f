import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mtl_reference import aligned, flat

from cljax.mtl import aligned_mtl


@pytest.mark.parametrize("t", [2, 4])
def test_matches_reference(rng, t):
    g = {"a": jnp.asarray(rng.normal(size=(t, 12)) * rng.uniform(0.5, 2, (t, 1)), jnp.float32)}
    out = np.asarray(jax.jit(aligned_mtl)(g)["a"], np.float64)
    np.testing.assert_allclose(out, aligned(flat(g)), rtol=1e-4, atol=1e-4)


def test_orthogonal_equal_norm_and_identical(rng):
    g = {"a": jnp.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])}
    np.testing.assert_allclose(aligned_mtl(g)["a"], [2.0, 2.0, 0.0], rtol=1e-5)
    g0 = rng.normal(size=4)
    g = {"a": jnp.asarray(np.stack([g0] * 3), jnp.float32)}
    np.testing.assert_allclose(aligned_mtl(g)["a"], 3 * g0, rtol=1e-4)


def test_needs_two_tasks():
    with pytest.raises(ValueError, match="aligned_mtl: got T=1"):
        aligned_mtl({"a": jnp.ones((1, 3))})
