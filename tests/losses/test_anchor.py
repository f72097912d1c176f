"""L2 to an anchor against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import losses


@pytest.mark.slow
def test_sum_and_mean_match_numpy(rng):
    p = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.ones(5, jnp.bfloat16)}
    a = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5, jnp.bfloat16)}
    ss = np.sum(np.asarray(p["a"], np.float64) ** 2) + 5.0
    assert float(losses.l2_anchor(p, a, weight=2.0)) == pytest.approx(2.0 * ss, rel=1e-6)
    assert float(jax.jit(lambda q: losses.l2_anchor(q, a, reduction="mean"))(p)) == pytest.approx(
        ss / 17, rel=1e-6
    )
    only_a = losses.l2_anchor(p, a, mask={"a": True, "b": False})
    assert float(only_a) == pytest.approx(ss - 5.0, rel=1e-6)
    g = jax.grad(lambda q: losses.l2_anchor(q, a, weight=0.5))(p)
    np.testing.assert_allclose(g["a"], p["a"], rtol=1e-6)  # d/dq 0.5 * (q - a)^2


def test_bad_inputs():
    p = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"weight=-1 must be >= 0"):
        losses.l2_anchor(p, p, weight=-1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"l2_anchor: weight=.* must be finite"):
            losses.l2_anchor(p, p, weight=bad)
    with pytest.raises(ValueError, match=r"reduction='max'"):
        losses.l2_anchor(p, p, reduction="max")
    with pytest.raises(ValueError, match=r"selects no parameter"):
        losses.l2_anchor(p, p, mask={"a": False})
    with pytest.raises(ValueError, match=r"shape mismatch at path 'a'"):
        losses.l2_anchor(p, {"a": jnp.ones(3)})
