import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.mtl import graddrop


def test_matches_elementwise_reference(rng):
    g = {"a": jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)}
    key = jax.random.key(4)
    out = np.asarray(jax.jit(graddrop)(g, key=key)["a"])
    (k,) = jax.random.split(key, 1)
    x = np.asarray(g["a"], np.float64)
    p = 0.5 * (1 + x.sum(0) / np.abs(x).sum(0))
    u = np.asarray(jax.random.uniform(k, (50,), jnp.float32))
    keep = ((p > u) & (x > 0)) | ((p < u) & (x < 0))
    np.testing.assert_allclose(out, (keep * x).sum(0), rtol=1e-5, atol=1e-6)
    # Each coordinate keeps components of one sign only.
    assert np.all((keep & (x > 0)).any(0) & (keep & (x < 0)).any(0) == False)  # noqa: E712


@pytest.mark.slow
def test_same_signs_and_identical_sum(rng):
    g = {"a": jnp.asarray(np.abs(rng.normal(size=(2, 20))), jnp.float32)}
    np.testing.assert_allclose(
        graddrop(g, key=jax.random.key(0))["a"], np.asarray(g["a"]).sum(0), rtol=1e-6
    )
    g0 = rng.normal(size=20)
    g = {"a": jnp.asarray(np.stack([g0] * 3), jnp.float32)}
    np.testing.assert_allclose(graddrop(g, key=jax.random.key(1))["a"], 3 * g0, rtol=1e-5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="leak=2"):
        graddrop({"a": jnp.ones((2, 3))}, key=jax.random.key(0), leak=2)
    with pytest.raises(ValueError, match="graddrop: key=None"):
        graddrop({"a": jnp.ones((2, 3))}, key=None)
