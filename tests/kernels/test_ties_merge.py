import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import SHAPES, TOL, tree, where_params

from cljax import kernels
from cljax.kernels import _dispatch, _ties_merge


def _np_ties(base, tvs, density, scale, merge):
    """Independent reference: numpy, a full sort for each task's threshold, float64 sums."""
    names = list(SHAPES)
    t = tvs[names[0]].shape[0]
    flat = np.concatenate([np.asarray(tvs[n], np.float64).reshape(t, -1) for n in names], 1)
    n = flat.shape[1]
    # The TIES code's topk_values_mask: the (n - int(n * density))-th smallest magnitude
    # (torch's 1-based kthvalue); density 1 (kthvalue(0) there) keeps everything.
    k = n - int(n * density)
    thr = np.sort(np.abs(flat), axis=1)[:, max(k, 1) - 1][:, None]
    trimmed = np.where(np.abs(flat) >= thr, flat, 0.0)
    elected = np.sign(trimmed.sum(0))
    majority = np.sign(np.sign(trimmed.sum(0)).sum())
    gamma = np.where(elected == 0, majority, elected)
    agree = np.where(gamma > 0, trimmed > 0, trimmed < 0)
    num = np.where(agree, trimmed, 0.0).sum(0)
    merged = num / np.maximum(agree.sum(0), 1) if merge == "mean" else num
    out, start = {}, 0
    for name in names:
        size = int(np.prod(SHAPES[name]))
        b = np.asarray(base[name], np.float64).reshape(-1)
        out[name] = (b + scale * merged[start : start + size]).reshape(SHAPES[name])
        start += size
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_kth_largest_matches_sort(rng, dtype):
    """Exact, ties included: values drawn from a small set repeat many times."""
    num_tasks = 4
    tvs = tree(rng, (num_tasks,), dtype=dtype)
    tvs["b"] = jnp.asarray(rng.integers(-3, 4, size=(num_tasks, 7)) * 0.5, dtype)
    flat = np.concatenate(
        [np.asarray(tvs[n], np.float32).reshape(num_tasks, -1) for n in SHAPES], 1
    )
    ordered = np.sort(np.abs(flat), axis=1)[:, ::-1]
    n = flat.shape[1]
    for k in (1, 2, 97, n // 3, n - 1, n):  # one compilation: k is traced inside
        got = kernels.kth_largest_magnitude(tvs, k)
        np.testing.assert_array_equal(got, ordered[:, k - 1], err_msg=f"{k=}")
    # Below-bin resolution: float32 values that share their top 16 bits.
    x = jnp.asarray(1.0 + rng.integers(0, 200, size=(2, 500)) * 2.0**-20, jnp.float32)
    xs = np.sort(np.asarray(x), axis=1)[:, ::-1]
    np.testing.assert_array_equal(kernels.kth_largest_magnitude(x, 123), xs[:, 122])


@pytest.mark.slow
@pytest.mark.parametrize("bs", where_params())
@pytest.mark.parametrize(
    ("dtype", "num_tasks", "merge", "density"),
    [(np.float32, 3, "mean", 0.2), (jnp.bfloat16, 8, "sum", 0.5)],
)
def test_matches_numpy(rng, bs, dtype, num_tasks, merge, density):
    base = tree(rng, dtype=dtype)
    tvs = tree(rng, (num_tasks,), dtype=dtype, scale=0.1)
    scale = 0.7
    fn = jax.jit(
        lambda b, t, s: kernels.ties(
            b, t, density=density, scale=s, merge=merge, implementation="pallas", block_sizes=bs
        )
    )
    got = fn(base, tvs, scale)
    want = _np_ties(base, tvs, density, scale, merge)
    tol = TOL[np.dtype(dtype)]
    for n in SHAPES:
        assert got[n].dtype == dtype and got[n].shape == SHAPES[n]
        np.testing.assert_allclose(np.asarray(got[n], np.float64), want[n], rtol=tol, atol=tol)
    if dtype == np.float32:  # the XLA reference too (once: each compilation costs seconds)
        ref = kernels.ties(
            base, tvs, density=density, scale=scale, merge=merge, implementation="xla"
        )
        for n in SHAPES:
            np.testing.assert_allclose(np.asarray(ref[n], np.float64), want[n], rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_hand_worked_election(impl):
    """Trim, mass vote, majority fallback for a zero sum, disjoint mean; worked by hand.

    Magnitudes of task 0: 4, 3, 2, 1 and of task 1: 1, 3, 2, 4; density 0.5 keeps
    int(4 * 0.5) + 1 = 3 each, as the TIES code counts (thresholds 2 and 2). Coordinate 1 sums to 3 - 3 = 0 and takes the majority sign of the
    other coordinates (+, +, + -> +), so only task 0's +3 survives there.
    """
    base = {"x": jnp.asarray([10.0, 20.0, 30.0, 40.0])}
    tvs = {"x": jnp.asarray([[4.0, 3.0, 2.0, -1.0], [-1.0, -3.0, 2.0, 4.0]])}
    got = kernels.ties(
        base, tvs, density=0.5, scale=1.0, implementation=impl, block_sizes=_BS[impl]
    )
    # coord 0: 4 (τ1's -1 trimmed); 1: tie -> +, mean(3) = 3; 2: mean(2, 2); 3: 4 (-1 trimmed)
    np.testing.assert_array_equal(got["x"], [14.0, 23.0, 32.0, 44.0])


_BS = {"xla": None, "pallas": _dispatch.BlockSizes(rows=32, min_rows=32)}


@pytest.mark.slow
@pytest.mark.parametrize("bs", where_params())
def test_every_output_entry_is_written(rng, bs):
    """The merge kernel over two leaves, outputs poisoned with NaN (aliased) before the call."""
    bs = _dispatch.block_sizes_or_default(bs)
    num_tasks, shapes = 2, [SHAPES["w"], SHAPES["v"]]
    tls = [_dispatch.tiling(int(np.prod(s)), bs) for s in shapes]
    assert tls[0].padded and tls[0].num_blocks > 1
    bases = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    taus = [jnp.asarray(rng.normal(size=(num_tasks, *s)), jnp.float32) for s in shapes]
    thr = jnp.asarray([0.8, 1.1], jnp.float32)
    poison = [[jnp.full((tl.rows, tl.lanes), jnp.nan, jnp.float32)] for tl in tls]
    kernel = functools.partial(
        _ties_merge._merge_kernel, num_tasks=num_tasks, merge="mean", has_base=True
    )
    outs, _ = jax.jit(
        lambda b, t, p: _dispatch.multi_call(
            kernel,
            tls,
            [
                [_dispatch.to_tiles(bi, tl), _dispatch.to_tiles(ti, tl, stacked=True)]
                for bi, ti, tl in zip(b, t, tls, strict=True)
            ],
            [_ties_merge._params(thr, 1.0, 0.5)],
            bs,
            leaf_outputs=[[jnp.float32], [jnp.float32]],
            poison=p,
            name="test",
        )
    )(bases, taus, poison)
    for (out,), tl, s, b, t in zip(outs, tls, shapes, bases, taus, strict=True):
        chex.assert_tree_all_finite(out)
        want = _ties_merge.disjoint_merge(
            b, list(t), thr, 1.0, 0.5, merge="mean", out_dtype=jnp.float32
        )
        np.testing.assert_allclose(_dispatch.from_tiles(out, tl, s), want, rtol=1e-6, atol=1e-6)


def test_errors(rng):
    base, tvs = tree(rng), tree(rng, (2,))
    with pytest.raises(ValueError, match=r"density=0 must be in \(0, 1\]"):
        kernels.ties(base, tvs, density=0)
    with pytest.raises(ValueError, match="merge='max' must be one of"):
        kernels.ties(base, tvs, merge="max")
    with pytest.raises(ValueError, match=r"k=0 must be an int in \[1, N="):
        kernels.kth_largest_magnitude(tvs, 0)
    with pytest.raises(ValueError, match="shape mismatch at path 'b'"):
        kernels.ties(base, {**tvs, "b": jnp.ones((2, 8))})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32])  # both histogram passes
def test_equals_merging_reference(rng, dtype):
    """cljax.merging.ties (global scope): the Pallas path equals its own XLA code exactly."""
    from cljax.merging import ties

    base = tree(rng, dtype=dtype)
    base["step"] = jnp.asarray(3, jnp.int32)  # integer leaves pass through
    tvs = {**tree(rng, (4,), dtype=dtype, scale=0.1), "step": jnp.zeros((4,), jnp.int32)}
    rules = [("^b$", False)]  # an excluded leaf keeps θ0 and does not count in N
    kw = dict(density=0.3, scale=1.1, merge="mean", rules=rules)
    got = ties(base, tvs, implementation="pallas", **kw)
    want = ties(base, tvs, implementation="xla", **kw)
    chex.assert_trees_all_equal_dtypes(got, want)
    tol = TOL[np.dtype(dtype)]
    chex.assert_trees_all_close(got, want, rtol=tol / 10, atol=tol / 10)
    np.testing.assert_array_equal(got["b"], base["b"])


def _np_disjoint_merge(slices, thr, majority, merge, mark):
    """τ_m of the merge pass step by step in float32 numpy, in the op's order of operations."""
    f32 = np.float32
    kept = [np.where(np.abs(x) >= thr[t], x, f32(0)) for t, x in enumerate(slices)]
    total = kept[0]
    for v in kept[1:]:
        total = total + v
    gamma = np.sign(total)
    gamma = np.where(gamma == 0, f32(majority), gamma)
    num, cnt = np.zeros_like(total), np.zeros_like(total)
    for v in kept:
        agree = np.where(gamma > 0, v > 0, v < 0)
        num = num + np.where(agree, v, f32(0))
        cnt = cnt + agree.astype(f32)
    merged = num / np.maximum(cnt, f32(1)) if merge == "mean" else num
    tie = (total == 0) & np.logical_or.reduce([v != 0 for v in kept])
    return np.where(mark & tie, f32(np.nan), merged)


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_disjoint_merge_bits_match_numpy(rng, merge):
    # The one merge op (used by cljax.merging.ties, eager and jitted, and by this module's
    # XLA path): τ_m has the float32 bits of a step-by-step numpy merge, exact cancellations
    # marked or given the majority sign; θ0 + λ·τ_m is that value rounded once (a fused
    # multiply-add) or twice, as XLA may compile it either way.
    shape, num_tasks = (37, 29), 4
    base = rng.normal(size=shape).astype(np.float32)
    slices = [(rng.normal(size=shape) * 1e-2).astype(np.float32) for _ in range(num_tasks)]
    slices[1][:3] = -slices[0][:3]  # exact cancellations in the first rows
    slices[2][:3] = slices[3][:3] = 0.0
    thr = np.quantile(np.abs(np.stack(slices)).reshape(num_tasks, -1), 0.6, axis=1)
    thr = thr.astype(np.float32)
    thr[3] = 1.0  # task 3 keeps nothing
    op = jax.jit(_ties_merge.disjoint_merge, static_argnames=("merge",))
    zero, one = np.zeros_like(base), jnp.float32(1.0)
    for majority, mark in [(1.0, False), (-1.0, False), (1.0, True)]:
        want = _np_disjoint_merge(slices, thr, majority, merge, mark)
        got = op(zero, slices, thr, jnp.float32(majority), one, merge=merge, mark=mark)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{majority=} {mark=}")
        got = np.asarray(op(base, slices, thr, jnp.float32(majority), 0.7, merge=merge, mark=mark))
        twice = base + np.float32(0.7) * want
        once = (base.astype(np.float64) + np.float64(np.float32(0.7)) * want).astype(np.float32)
        ok = (got == twice) | (got == once) | (np.isnan(got) & np.isnan(want))
        assert ok.all(), (got[~ok], twice[~ok], once[~ok])
    assert np.isnan(want[:3]).any()  # the marked cancellations
