import _mtl_reference as R
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.mtl import combine, gram


def _grads(rng, t, dtype=jnp.float32):
    return {
        "a": jnp.asarray(rng.normal(size=(t, 3, 4)), dtype),
        "b": {"c": jnp.asarray(rng.normal(size=(t, 5)), dtype)},
    }


def test_nonfinite_task_gradients_are_rejected_eagerly_and_pass_traced(rng):
    g = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.ones((3, 2))}
    g["w"] = g["w"].at[2, 1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"gram: task_grads\[2\] holds NaN or Inf at path 'w'"):
        gram(g)
    # inside a step the values are traced: the step's non-finite policy handles them
    assert np.isnan(np.asarray(jax.jit(gram)(g))).any()


def test_gram_is_global_dot_products(rng):
    g = _grads(rng, 3)
    f = R.flat(g)
    np.testing.assert_allclose(jax.jit(gram)(g), f @ f.T, rtol=1e-5, atol=1e-5)


def test_gram_accumulates_bfloat16_in_float32(rng):
    g = _grads(rng, 2, jnp.bfloat16)
    out = gram(g)
    assert out.dtype == jnp.float32
    f = R.flat(g)
    np.testing.assert_allclose(out, f @ f.T, rtol=1e-5, atol=1e-4)


def test_combine_weighted_sum_keeps_dtypes(rng):
    g = _grads(rng, 3, jnp.bfloat16)
    w = jnp.array([0.5, -1.0, 2.0])
    out = jax.jit(combine)(g, w)
    chex.assert_trees_all_equal_dtypes(out, jax.tree.map(lambda x: x[0], g))
    ref = np.asarray(w, np.float64) @ R.flat(g)
    np.testing.assert_allclose(
        R.flat(jax.tree.map(lambda x: x[None], out))[0], ref, rtol=2e-2, atol=2e-2
    )


def test_accepts_a_list_of_trees(rng):
    g = _grads(rng, 2)
    as_list = [jax.tree.map(lambda x, i=i: x[i], g) for i in range(2)]
    np.testing.assert_allclose(gram(as_list), gram(g), rtol=1e-6)


def test_mismatched_trees_name_the_path(rng):
    a = {"w": jnp.ones(3), "b": jnp.ones(2)}
    b = {"w": jnp.ones(3), "c": jnp.ones(2)}
    with pytest.raises(ValueError, match="path 'b'"):
        gram([a, b])
    with pytest.raises(ValueError, match="disagree on the leading"):
        gram({"w": jnp.ones((2, 3)), "b": jnp.ones((3, 2))})


def test_combine_rejects_wrong_weights(rng):
    with pytest.raises(ValueError, match=r"weights.shape=\(3,\) must be \(2,\)"):
        combine(_grads(rng, 2), jnp.ones(3))


def test_integer_leaves_are_rejected():
    with pytest.raises(ValueError, match="expected float"):
        gram({"w": jnp.ones((2, 3), jnp.int32)})
