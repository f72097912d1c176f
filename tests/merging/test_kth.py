import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.merging import _kth


def _as_value(bits):
    return np.asarray(jax.lax.bitcast_convert_type(bits, jnp.float32))


def _numpy_kth(per_task_leaves, k):
    """Slow reference: flatten each task's leaves, sort magnitudes, take the k-th largest."""
    out = []
    for leaves in per_task_leaves:
        flat = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in leaves])
        out.append(np.sort(flat)[::-1][k - 1])
    return np.array(out)


def _leaves(rng, num_tasks, shapes, dtype=np.float32):
    scale = 10.0 ** rng.uniform(-8, 2, size=len(shapes))  # many binades
    return [
        [jnp.asarray(rng.normal(size=s) * c, dtype) for _ in range(num_tasks)]
        for s, c in zip(shapes, scale, strict=True)
    ]


@pytest.mark.parametrize("k_frac", [0.0, 0.2, 0.5, 1.0])
def test_kth_largest_matches_sort(rng, k_frac):
    shapes = [(7, 5), (13,), (3, 4, 6), (1,)]
    leaves = _leaves(rng, 3, shapes)
    n = sum(int(np.prod(s)) for s in shapes)
    k = max(1, int(k_frac * n))
    got = _as_value(jax.jit(_kth.kth_largest_bits, static_argnums=1)(leaves, k))
    per_task = [[leaf[t] for leaf in leaves] for t in range(3)]
    np.testing.assert_array_equal(got, _numpy_kth(per_task, k))


def test_kth_with_duplicates_zeros_and_subnormals(rng):
    vals = np.array([0.0, 0.0, 1e-40, -1e-40, 3.0, -3.0, 3.0, 2.5, 0.0, 7.0], np.float32)
    leaves = [[jnp.asarray(vals[:4])], [jnp.asarray(vals[4:].reshape(2, 3))]]
    for k in range(1, 11):
        got = _as_value(_kth.kth_largest_bits(leaves, k))
        expected = np.sort(np.abs(vals))[::-1][k - 1]
        np.testing.assert_array_equal(got, [expected], err_msg=f"{k=}")


@pytest.mark.parametrize("num_candidates", [1, 3, 15])
def test_kth_any_number_of_candidates(rng, num_candidates):
    leaves = _leaves(rng, 2, [(20, 9), (31,)])
    got = _as_value(_kth.kth_largest_bits(leaves, 17, num_candidates=num_candidates))
    per_task = [[leaf[t] for leaf in leaves] for t in range(2)]
    np.testing.assert_array_equal(got, _numpy_kth(per_task, 17))


def test_kth_bfloat16(rng):
    leaves = _leaves(rng, 2, [(16, 8), (5,)], dtype=jnp.bfloat16)
    got = _as_value(_kth.kth_largest_bits(leaves, 40))
    per_task = [[leaf[t] for leaf in leaves] for t in range(2)]
    np.testing.assert_array_equal(got, _numpy_kth(per_task, 40))


def test_count_at_least(rng):
    x = jnp.asarray(rng.normal(size=(6, 11)), jnp.float32)
    cands = jnp.sort(_kth.magnitude_bits(jnp.asarray(rng.normal(size=(5,)), jnp.float32)))
    got = np.asarray(_kth.count_at_least(x, cands))
    expected = [(np.abs(np.asarray(x)) >= v).sum() for v in _as_value(cands)]
    np.testing.assert_array_equal(got, expected)
