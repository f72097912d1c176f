import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _mtl_reference import flat
from _mtl_reference import pcgrad as pcgrad_ref

from cljax.mtl import pcgrad


@pytest.mark.slow
@pytest.mark.parametrize("t", [2, 3, 5])
def test_matches_loop_reference(rng, t):
    g = {
        "a": jnp.asarray(rng.normal(size=(t, 6)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(t, 2, 2)), jnp.float32),
    }
    key = jax.random.key(3)
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(key, t)))
    ref = pcgrad_ref(flat(g), orders)
    out = flat(jax.tree.map(lambda x: x[None], jax.jit(pcgrad)(g, key=key)))[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_two_tasks_nonnegative_inner_products(rng):
    for _ in range(10):
        g = {"w": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)}
        d = np.asarray(pcgrad(g, key=jax.random.key(0))["w"], np.float64)
        gs = flat(g)
        assert gs[0] @ d >= -1e-5 and gs[1] @ d >= -1e-5


def test_conflict_is_projected_away():
    g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    # pc_0 = g0 - (-1/2) g1 = (0.5, 0.5); pc_1 = g1 - (-1) g0 = (0, 1).
    np.testing.assert_allclose(pcgrad(g, key=jax.random.key(0))["w"], [0.5, 1.5], atol=1e-6)


def test_identical_gradients_sum(rng):
    g0 = rng.normal(size=4)
    g = {"w": jnp.asarray(np.stack([g0] * 3), jnp.float32)}
    np.testing.assert_allclose(pcgrad(g, key=jax.random.key(1))["w"], 3 * g0, rtol=1e-5)


def test_needs_key_and_two_tasks():
    with pytest.raises(ValueError, match="pcgrad: key=None"):
        pcgrad({"w": jnp.ones((2, 3))}, key=None)
    with pytest.raises(ValueError, match="needs T >= 2"):
        pcgrad({"w": jnp.ones((1, 3))}, key=jax.random.key(0))
