import jax
import jax.numpy as jnp
import numpy as np

from cljax.merging import _kth


def _as_value(bits):
    return np.asarray(jax.lax.bitcast_convert_type(bits, jnp.float32))


def _numpy_kth(per_task_leaves, k):
    """Slow reference: flatten each task's leaves, sort magnitudes, take the k-th largest
    (subnormals read as zero, as compares on the hardware flush them)."""
    out = []
    for leaves in per_task_leaves:
        flat = np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in leaves])
        flat = np.where(flat < np.finfo(np.float32).tiny, 0, flat)
        out.append(np.sort(flat)[::-1][k - 1])
    return np.array(out)


def _leaves(rng, num_tasks, shapes, dtype=np.float32):
    scale = 10.0 ** rng.uniform(-8, 2, size=len(shapes))  # many binades
    return [
        [jnp.asarray(rng.normal(size=s) * c, dtype) for _ in range(num_tasks)]
        for s, c in zip(shapes, scale, strict=True)
    ]


def test_kth_largest_matches_sort(rng):
    shapes = [(7, 5), (13,), (3, 4, 6), (1,)]
    leaves = _leaves(rng, 3, shapes)
    n = sum(int(np.prod(s)) for s in shapes)
    per_task = [[leaf[t] for leaf in leaves] for t in range(3)]
    select = jax.jit(_kth.kth_largest_bits)  # k traced: one compilation for every k
    for k in sorted({1, 2, n // 5, n // 2, n - 1, n}):
        got = _as_value(select(leaves, k))
        np.testing.assert_array_equal(got, _numpy_kth(per_task, k), err_msg=f"{k=}")


def test_kth_with_duplicates_zeros_and_subnormals(rng):
    vals = np.array([0.0, 0.0, 1e-40, -1e-40, 3.0, -3.0, 3.0, 2.5, 0.0, 7.0], np.float32)
    leaves = [[jnp.asarray(vals[:4])], [jnp.asarray(vals[4:].reshape(2, 3))]]
    select = jax.jit(_kth.kth_largest_bits)  # k traced: one compilation for every k
    for k in range(1, 11):
        got = _as_value(select(leaves, k))
        np.testing.assert_array_equal(got, _numpy_kth([[vals]], k), err_msg=f"{k=}")


def test_kth_stacked_leaves_equal_lists(rng):
    leaves = _leaves(rng, 2, [(20, 9), (31,)])
    stacked = [jnp.stack(x) for x in leaves]
    got = _as_value(_kth.kth_largest_bits(stacked, 17))
    per_task = [[leaf[t] for leaf in leaves] for t in range(2)]
    np.testing.assert_array_equal(got, _numpy_kth(per_task, 17))


def test_kth_bfloat16(rng):
    leaves = _leaves(rng, 2, [(16, 8), (5,)], dtype=jnp.bfloat16)
    got = _as_value(_kth.kth_largest_bits(leaves, 40))
    per_task = [[leaf[t] for leaf in leaves] for t in range(2)]
    np.testing.assert_array_equal(got, _numpy_kth(per_task, 40))


def test_count_at_least(rng):
    x = jnp.asarray(rng.normal(size=(3, 6, 11)), jnp.float32)
    thr = jnp.abs(jnp.asarray(rng.normal(size=(3,)), jnp.float32))
    got = np.asarray(_kth.count_at_least(x, thr, batch_dims=1))
    expected = [(np.abs(np.asarray(x[t])) >= thr[t]).sum() for t in range(3)]
    np.testing.assert_array_equal(got, expected)
    assert int(_kth.count_at_least(x[0], thr[0])) == expected[0]
