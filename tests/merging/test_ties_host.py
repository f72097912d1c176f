"""Eager TIES on CPU arrays: the threshold on the host, the chunk program.

The host threshold is checked against a sort, and the merge's windows (a ragged last one
included) against a single window and the numpy reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import tree as ct
from cljax.merging import _kth, ties
from tests.merging.test_ties import _check, _reference, _t_trees, _vectorised_reference


def _sorted_kth(rows, k):
    """The k-th largest float32 magnitude pattern per task by a full sort (NaN as 0,
    below the smallest normal float32 reported as 0)."""
    out = []
    for t in range(len(rows[0])):
        a = np.abs(np.concatenate([np.asarray(r[t], np.float32) for r in rows]))
        a[np.isnan(a)] = 0
        bits = int(np.sort(a)[::-1][k - 1].view(np.uint32))
        out.append(0 if bits < 0x00800000 else bits)
    return np.asarray(out, np.uint32)


def _leaves(rng, shapes, num_tasks, dtype, *, zeros=0.0, levels=None):
    leaves = []
    for s in shapes:
        x = rng.standard_t(3, size=(num_tasks, *s)).astype(np.float32)
        if zeros:
            x[rng.random(x.shape) < zeros] = 0
        if levels:
            x = np.round(x * levels) / levels
        leaves.append(jnp.asarray(x, dtype))
    return leaves


@pytest.mark.parametrize(
    "dtype,zeros,levels",
    [(jnp.float32, 0.0, None), (jnp.bfloat16, 0.5, None), (jnp.float32, 0.3, 4)],
)
def test_host_threshold_is_exact(rng, dtype, zeros, levels):
    # Above _EXACT_MAX entries a task (the sampled bracket) and below it (a partition),
    # with zeros and few distinct values (ties at the threshold), at extreme ranks too.
    for shapes in ([(300, 250), (900,)], [(40, 30), (7,)]):
        leaves = _leaves(rng, shapes, 3, dtype, zeros=zeros, levels=levels)
        rows = [_kth.task_rows(x, 3) for x in leaves]
        n = sum(r[0].size for r in rows)
        for k in (1, 3, n // 5, n // 2, n - 1, n):
            got = _kth.kth_bits(rows, k)
            want = _sorted_kth(rows, k)
            if got is None:  # a bracket crowded by tied values: the caller searches
                assert levels is not None
                continue
            np.testing.assert_array_equal(got, want, err_msg=f"{shapes} {k=}")
    # A list of T arrays reads the same rows as the stacked leaf.
    leaves = _leaves(rng, [(300, 250)], 3, jnp.float32)
    as_list = tuple(leaves[0][t] for t in range(3))
    want = _sorted_kth([_kth.task_rows(leaves[0], 3)], 15001)
    np.testing.assert_array_equal(_kth.kth_bits([_kth.task_rows(as_list, 3)], 15001), want)


def test_missed_bracket_falls_back_to_the_search(rng, monkeypatch):
    # A bracket that misses the k-th entry: kth_bits says so, and ties() then takes the
    # counting search's threshold (the numpy reference's merge).
    monkeypatch.setattr(_kth, "_EXACT_MAX", 100)  # a small leaf takes the sampled bracket
    monkeypatch.setattr(_kth, "_bracket", lambda desc, k, n: (0x3F800000, 0x3F800001))
    shapes = {"a": (41, 29), "b": (13,)}
    pre, taus = _t_trees(rng, shapes, 2)
    rows = [_kth.task_rows(tuple(t[p] for t in taus), 2) for p in shapes]
    assert _kth.kth_bits(rows, 301) is None
    got = ties(pre, taus, density=0.25, scale=0.5)
    ref = _vectorised_reference(pre, taus, density=0.25, scale=0.5, scope="global")
    for p in shapes:
        np.testing.assert_allclose(np.asarray(got[p]), ref[p], rtol=1e-5, atol=1e-6, err_msg=p)


def test_windows_cover_a_row():
    assert _kth.windows(8, 4) == [0, 4]
    assert _kth.windows(10, 4) == [0, 4, 6]
    assert _kth.windows(4, 4) == [0]
    buf = _kth.aligned_empty(5, np.float32)
    assert buf.ctypes.data % 64 == 0 and buf.shape == (5,)


# With 256-entry chunks: a leaf of two windows and a ragged third (overlapping the second),
# a leaf of one window, and leaves sharing windows (or, below the window but above
# ``SHARED``, one padded window each).
_SMALL_CHUNK = 256
_WINDOWED = {"a": (2, 300), "b": (256,), "c": (30, 7), "d": (5,)}


@pytest.mark.parametrize("scope", ["global", "leaf"])
def test_windows_do_not_change_the_merge(rng, monkeypatch, scope):
    # Leaves read in windows (the last one overlapping) or copied into a shared window
    # give the same bits; exact cancellations take the second round. The values are those
    # of the numpy reference (test_ties.py checks the eager merge against the references).
    pre, taus = _t_trees(rng, _WINDOWED, 3)
    taus[1]["a"] = taus[1]["a"].at[0, -5:].set(-taus[0]["a"][0, -5:])
    taus[2]["a"] = taus[2]["a"].at[0, -5:].set(0)
    taus = ct.stack(taus)
    monkeypatch.setattr(_kth, "CHUNK", 4 * _SMALL_CHUNK)  # every leaf in one shared window
    shared = ties(pre, taus, density=0.9, scale=0.8, scope=scope)
    monkeypatch.setattr(_kth, "CHUNK", _SMALL_CHUNK)
    windowed = ties(pre, taus, density=0.9, scale=0.8, scope=scope)
    monkeypatch.setattr(_kth, "SHARED", 64)  # "c" in a zero-padded window of its own
    padded = ties(pre, taus, density=0.9, scale=0.8, scope=scope)
    ref = _reference(pre, ct.unstack(taus), density=0.9, scale=0.8, merge="mean", scope=scope)
    for p in _WINDOWED:
        for got in (windowed, padded):
            assert isinstance(got[p], jax.Array) and got[p].shape == pre[p].shape
            np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(shared[p]), err_msg=p)
    _check(windowed, ref)
