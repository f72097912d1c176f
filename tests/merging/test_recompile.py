"""A merge with a new λ, density or drop rate reuses the compiled program.

The hyperparameters a user sweeps are data of the compiled merge, not constants baked into
it: these tests count the entries of the jitted cores' caches around a sweep (a new entry
is a new compilation) and check each swept result against an independent numpy reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.kernels._ties_threshold import xla as threshold_xla
from cljax.merging import _dare, _task_vectors, _ties, dare, task_arithmetic, ties
from cljax.merging._dare import entry_bits
from tests.merging.test_ties import _t_trees, _vectorised_reference

# Shapes no other test uses, so that another test's compilations cannot hide a new one.
_SHAPES = {"a": (23, 29), "b": (31,), "c": (7, 3)}


def _sizes(*modules):
    """The cache size of every compiled function of ``modules`` (default: TIES')."""
    return {
        f"{mod.__name__}.{name}": fn._cache_size()
        for mod in modules or (_ties, threshold_xla)
        for name, fn in vars(mod).items()
        if hasattr(fn, "_cache_size")
    }


@pytest.mark.parametrize("scope", ["global", "leaf"])
def test_ties_sweep_compiles_once(rng, scope):
    pre, taus = _t_trees(rng, _SHAPES, 3)
    ties(pre, taus, density=0.2, scale=0.5, scope=scope)
    before = _sizes()
    # An int λ counts as a number like any other (no new weak-type signature).
    for density, scale in [(0.35, 0.9), (0.8, 1), (1.0, 0.25)]:
        got = ties(pre, taus, density=density, scale=scale, scope=scope)
        ref = _vectorised_reference(pre, taus, density=density, scale=scale, scope=scope)
        for p, x in got.items():
            np.testing.assert_allclose(np.asarray(x), ref[p], rtol=1e-5, atol=1e-6, err_msg=p)
    assert _sizes() == before
    assert sum(before.values()) > 0


def test_task_arithmetic_sweep_compiles_once(rng):
    pre, taus = _t_trees(rng, _SHAPES, 3)
    task_arithmetic(pre, taus, 0.5)
    before = _task_vectors._task_arithmetic_core._cache_size()
    for scale in (0.1, 1.7, 2):
        got = task_arithmetic(pre, taus, scale)
        for p, x in got.items():
            want = np.asarray(pre[p], np.float64) + scale * sum(
                np.asarray(t[p], np.float64) for t in taus
            )
            np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, atol=1e-6, err_msg=p)
    assert _task_vectors._task_arithmetic_core._cache_size() == before


def test_dare_sweep_compiles_once(rng):
    _, taus = _t_trees(rng, _SHAPES, 2)
    key = jax.random.key(4)
    # Independent of the merge's code path: the documented key of each task and leaf and
    # its entry bits; then the cutoff and the float32 factor in numpy.
    bits = {}
    for path, shape in _SHAPES.items():
        h = _dare._common.path_hash(path)
        for t in range(2):
            words = jax.random.bits(
                jax.random.fold_in(jax.random.fold_in(key, t), h), (2,), jnp.uint32
            )
            bits[path, t] = np.asarray(entry_bits(shape, words))
    dare(taus, drop_rate=0.1, key=key)
    before = _sizes(_dare)
    for p in (0.5, 0.9, 0.0, 0.3):
        got = dare(taus, drop_rate=p, key=key)
        cutoff = np.uint32(min(round(p * 2.0**32), 2**32 - 1))
        for path, x in got.items():
            for t in range(2):
                v = np.asarray(taus[t][path], np.float32)
                want = np.where(bits[path, t] >= cutoff, v * np.float32(1 / (1 - p)), 0)
                np.testing.assert_array_equal(np.asarray(x[t]), want, err_msg=f"{path} {t}")
    assert _sizes(_dare) == before
    assert sum(before.values()) > 0  # the eager path's programs are in the count
