import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mtl_reference import flat

from cljax.mtl import linear


def test_default_is_the_mean(rng):
    g = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    np.testing.assert_allclose(jax.jit(linear)(g)["w"], flat(g).mean(0), rtol=1e-6, atol=1e-6)


def test_explicit_weights(rng):
    g = {"w": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}
    out = linear(g, weights=jnp.array([1.0, -2.0]))
    np.testing.assert_allclose(out["w"], flat(g)[0] - 2 * flat(g)[1], rtol=1e-6, atol=1e-6)


def test_bad_weights():
    with pytest.raises(ValueError, match="linear: weights.shape"):
        linear({"w": jnp.ones((2, 3))}, weights=[1.0, 2.0, 3.0])
