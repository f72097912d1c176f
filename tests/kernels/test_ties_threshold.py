"""The TIES threshold op: every implementation through one test body, against a sort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import INTERPRET_BLOCKS

from cljax import kernels
from cljax.kernels._ties_threshold import IMPLEMENTATIONS, keep_count, ties_threshold
from cljax.merging import _common

_SHAPES = [(31, 40), (130,), (3, 5)]  # 1,385 entries a task; "a" tiled, the rest packed


def _leaves(rng, num_tasks, dtype):
    """Values on a coarse grid (many exact ties), of both signs, a few zeros."""
    return [
        jnp.asarray(rng.integers(-40, 41, size=(num_tasks, *s)) * 0.125, dtype) for s in _SHAPES
    ]


def _sorted_magnitudes(leaves):
    flat = np.concatenate(
        [np.abs(np.asarray(x, np.float32)).reshape(x.shape[0], -1) for x in leaves], 1
    )
    return np.sort(flat, axis=1)[:, ::-1]


def _threshold(impl, leaves, k):
    if impl == "xla, traced":
        fn = jax.jit(lambda xs, kk: ties_threshold(xs, kk, implementation="xla"))
        return fn(leaves, jnp.uint32(k))
    if impl == "numpy":  # host arrays, per leaf a sequence of T
        host = [[np.asarray(x[t]) for t in range(x.shape[0])] for x in leaves]
        return ties_threshold(host, k, implementation="numpy")
    return ties_threshold(leaves, k, implementation=impl, block_sizes=INTERPRET_BLOCKS)


_LONG = pytest.mark.long  # interpret mode: 11 passes of kernels; kernels.ties' tests run it too


@pytest.mark.parametrize(
    ("impl", "dtype"),
    [
        ("xla", np.float32),
        ("xla", jnp.bfloat16),
        ("xla, traced", np.float32),
        ("numpy", np.float32),
        ("numpy", jnp.bfloat16),
        pytest.param("pallas", np.float32, marks=_LONG),
        pytest.param("pallas", jnp.bfloat16, marks=_LONG),
    ],
)
def test_every_implementation_equals_a_sort(rng, impl, dtype):
    leaves = _leaves(rng, 3, dtype)
    want = _sorted_magnitudes(leaves)
    n = want.shape[1]
    for k in (1, 2, 700, n - 1, n):  # one compilation: k is data
        bits = np.asarray(_threshold(impl, leaves, k))
        assert bits.dtype == np.uint32 and bits.shape == (3,)
        np.testing.assert_array_equal(
            _flush(bits.view(np.float32)), want[:, k - 1], err_msg=f"{k=}"
        )


def _flush(v):
    """Values below the smallest normal float32 as 0: there the implementations may differ
    (the compares that apply a threshold flush them on CPUs and accelerators)."""
    return np.where(v < np.finfo(np.float32).tiny, np.float32(0), v)


def test_implementations_are_listed():
    assert IMPLEMENTATIONS == ("xla", "pallas", "numpy")


def test_one_keep_count():
    # The merging code, the fused merge and the streaming merge read this one function.
    assert kernels.keep_count is keep_count is _common.keep_count
    assert kernels._ties_merge.keep_count is keep_count


def test_errors(rng):
    leaves = _leaves(rng, 2, np.float32)
    n = sum(int(np.prod(s)) for s in _SHAPES)
    with pytest.raises(ValueError, match="implementation='cuda' must be None or one of"):
        ties_threshold(leaves, 3, implementation="cuda")
    with pytest.raises(ValueError, match="leaves is empty"):
        ties_threshold([], 3)
    with pytest.raises(ValueError, match=rf"k=0 must be in \[1, N={n}\]"):
        ties_threshold(leaves, 0, implementation="xla")
    with pytest.raises(ValueError, match=rf"k={n + 1} must be in \[1, N={n}\]"):
        ties_threshold(leaves, n + 1, implementation="pallas")
    host = [[np.asarray(x[t]) for t in range(2)] for x in leaves]
    with pytest.raises(ValueError, match=rf"k={n + 1} must be in \[1, N={n}\]"):
        ties_threshold(host, n + 1, implementation="numpy")
    with pytest.raises(ValueError, match="k=0 must be an int >= 1"):
        ties_threshold(host, 0, implementation="numpy")
