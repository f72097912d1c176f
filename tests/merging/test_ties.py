import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import kernels
from cljax import tree as ct
from cljax.kernels._ties_threshold import xla as threshold_xla
from cljax.merging import _common, _streaming, _ties, ties


def _tree(rng, dtype=np.float32, scales=(1.0, 1.0, 1.0)):
    return {
        "enc": {
            "kernel": jnp.asarray(rng.normal(size=(6, 5)) * scales[0], dtype),
            "bias": jnp.asarray(rng.normal(size=(5,)) * scales[1], dtype),
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)) * scales[2], dtype)},
        "step": jnp.asarray([3, 4], jnp.int32),
    }


def _paper_mask(flat, density):
    """``topk_values_mask`` of the TIES code, literally, on a ``(T, d)`` array: k = d -
    int(d * K), the k-th smallest |M| of each row (``kthvalue``), keep ``|M| >= it``."""
    d = flat.shape[1]
    k = d - int(d * density)
    if k == 0:  # density 1: kthvalue(0) fails in the reference; cljax keeps every entry
        return np.ones(flat.shape, bool)
    kth = np.sort(np.abs(flat), axis=1)[:, k - 1 : k]
    return np.abs(flat) >= kth


def _mergekit_mask(flat, density):
    """mergekit's ``magnitude`` sparsification, literally, per row of a ``(T, d)`` array:
    k = int(density * numel), the first k of a descending argsort of |x| are kept."""
    mask = np.zeros(flat.shape, bool)
    if density >= 1:
        return ~mask
    k = int(density * flat.shape[1])
    if k == 0:  # mergekit asserts k > 0 here; cljax keeps nothing (the leaf keeps theta0)
        return mask
    for t in range(flat.shape[0]):
        mask[t, np.argsort(-np.abs(flat[t]), kind="stable")[:k]] = True
    return mask


def _reference(pre, taus, *, density, scale, merge, scope, excluded=()):
    """Slow numpy TIES after the reference code: flatten, sort per task, vote, merge."""
    paths = [
        p
        for p, x in ct.leaves_with_paths(pre)
        if ct.is_float(x) and not any(e in p for e in excluded)
    ]
    tv = {
        p: np.stack([np.asarray(dict(ct.leaves_with_paths(t))[p], np.float32) for t in taus])
        for p in paths
    }
    T = len(taus)
    groups = [paths] if scope == "global" else [[p] for p in paths]
    trimmed = {}
    for group in groups:
        flat = np.concatenate([tv[p].reshape(T, -1) for p in group], axis=1)
        keep = (_paper_mask if scope == "global" else _mergekit_mask)(flat, density)
        start = 0
        for p in group:
            size = tv[p][0].size
            kept = np.where(keep[:, start : start + size], flat[:, start : start + size], 0)
            trimmed[p] = kept.reshape(tv[p].shape)
            start += size
    gammas = {p: np.sign(trimmed[p].sum(0)) for p in paths}
    majority = np.sign(sum(g.sum() for g in gammas.values()))
    out = {p: np.asarray(x) for p, x in ct.leaves_with_paths(pre)}
    for p in paths:
        g = np.where(gammas[p] == 0, majority, gammas[p])
        merged = np.zeros(g.shape)
        count = np.zeros(g.shape)
        for idx in np.ndindex(g.shape):  # the disjoint merge, one coordinate at a time
            for t in range(T):
                v = trimmed[p][(t, *idx)]
                if (g[idx] > 0 and v > 0) or (g[idx] <= 0 and v < 0):
                    merged[idx] += v
                    count[idx] += 1
        if merge == "mean":
            merged = merged / np.maximum(count, 1)
        out[p] = (
            np.asarray(pre_leaf := dict(ct.leaves_with_paths(pre))[p], np.float64) + scale * merged
        )
        del pre_leaf
    return out


def _check(got, ref, rtol=1e-5, atol=1e-6):
    for p, x in ct.leaves_with_paths(got):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), ref[p], rtol=rtol, atol=atol, err_msg=p
        )


@pytest.mark.parametrize(
    "density,merge,scope",
    [(0.2, "mean", "global"), (0.5, "sum", "global"), (0.3, "mean", "leaf"), (0.1, "sum", "leaf")],
)
def test_ties_matches_numpy_reference(rng, density, merge, scope):
    pre = _tree(rng)
    taus = [_tree(rng, scales=(1.0, 3.0, 0.2)) for _ in range(4)]
    got = ties(pre, taus, density=density, scale=0.7, merge=merge, scope=scope)
    _check(got, _reference(pre, taus, density=density, scale=0.7, merge=merge, scope=scope))


def _vectorised_reference(pre, taus, *, density, scale, scope):
    """TIES in numpy, thresholds by np.partition (rank from each scope's reference rule);
    asserts the inputs hold no exact ties."""
    paths = sorted(pre)
    num_tasks = len(taus)
    tv = {p: np.stack([np.asarray(t[p]) for t in taus]).reshape(num_tasks, -1) for p in paths}
    groups = [paths] if scope == "global" else [[p] for p in paths]
    thr = {}
    for group in groups:
        a = np.abs(np.concatenate([tv[p] for p in group], axis=1))
        n = a.shape[1]
        # k-th largest: the paper's (n - int(n d))-th smallest, or mergekit's int(n d)-th.
        k = min(int(n * density) + 1, n) if scope == "global" else int(n * density)
        assert k >= 1
        kth = -np.partition(-a, k - 1, axis=1)[:, k - 1]
        thr.update(dict.fromkeys(group, kth[:, None]))
    out = {}
    for p in paths:
        kept = np.where(np.abs(tv[p]) >= thr[p], tv[p], 0)
        gamma = np.sign(kept.sum(0))
        assert (gamma != 0).all() or not (kept != 0).any(0)[gamma == 0].any()  # no ties
        agree = np.where(gamma > 0, kept > 0, kept < 0)
        mean = (kept * agree).sum(0) / np.maximum(agree.sum(0), 1)
        out[p] = (np.asarray(pre[p]).reshape(-1) + scale * mean).reshape(pre[p].shape)
    return out


def _t_trees(rng, shapes, num_tasks):
    pre = {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}
    taus = [
        {p: jnp.asarray(rng.standard_t(3, size=s), jnp.float32) for p, s in shapes.items()}
        for _ in range(num_tasks)
    ]
    return pre, taus


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "leaf"])
def test_ties_through_the_counting_search(rng, scope):
    # More than 2**14 entries a task (global) and a leaf above it too (leaf scope): the
    # thresholds come from the counting search, not the sort small inputs take.
    pre, taus = _t_trees(rng, {"a": (160, 130), "b": (70,), "c": (40, 30)}, 4)
    got = ties(pre, taus, density=0.15, scale=0.7, scope=scope)
    ref = _vectorised_reference(pre, taus, density=0.15, scale=0.7, scope=scope)
    for p, x in got.items():
        np.testing.assert_allclose(np.asarray(x), ref[p], rtol=1e-5, atol=1e-6, err_msg=p)


@pytest.mark.slow
@pytest.mark.parametrize("form", [pytest.param("list", marks=pytest.mark.long), "stacked"])
def test_leaf_scope_called_eagerly_compiles_no_search(rng, form):
    # Eager per-leaf TIES on CPU arrays finds each leaf's threshold on the host (no search
    # program is compiled) and merges with one program for all shapes (leaf shapes no other
    # test uses); each leaf keeps its own threshold: the result equals the jitted merge's,
    # where every leaf is searched in the graph, and the numpy reference.
    shapes = {"a": (161, 131), "b": (161, 131), "c": (90,), "d": (90,), "e": (7, 11)}
    pre, taus = _t_trees(rng, shapes, 3)
    for p in ("b", "d"):  # thresholds that differ from those of the same-shaped a and c
        taus[0][p] = 4.0 * taus[0][p]
    if form == "stacked":
        taus = ct.stack(taus)
    searches = threshold_xla._count_leaf._cache_size()
    merges = _ties._merge_chunk._cache_size()
    eager = ties(pre, taus, density=0.2, scale=0.9, scope="leaf")
    assert threshold_xla._count_leaf._cache_size() == searches
    assert _ties._merge_chunk._cache_size() <= merges + 1
    jitted = jax.jit(lambda p, t: ties(p, t, density=0.2, scale=0.9, scope="leaf"))(pre, taus)
    taus = ct.unstack(taus) if form == "stacked" else taus
    ref = _vectorised_reference(pre, taus, density=0.2, scale=0.9, scope="leaf")
    for p in shapes:
        # The same bits at XLA's default optimisation level; the tests compile at level 0,
        # where the eager and jitted programs may round θ0 + λ·τ differently (one float32
        # eps of the leaf's scale).
        want = np.asarray(jitted[p])
        tol = 2 * np.finfo(np.float32).eps * np.abs(want).max()
        np.testing.assert_allclose(np.asarray(eager[p]), want, rtol=0, atol=tol, err_msg=p)
        np.testing.assert_allclose(np.asarray(eager[p]), ref[p], rtol=1e-5, atol=1e-6, err_msg=p)


def test_ties_stacked_input_and_rules(rng):
    pre = _tree(rng)
    taus = [_tree(rng) for _ in range(3)]
    got = ties(pre, ct.stack(taus), density=0.25, rules=[("^head/", False)])
    np.testing.assert_array_equal(got["head"]["kernel"], pre["head"]["kernel"])
    np.testing.assert_array_equal(got["step"], pre["step"])
    # Excluded leaves do not count in N and do not vote.
    ref = _reference(
        pre, taus, density=0.25, scale=1.0, merge="mean", scope="global", excluded=("head",)
    )
    _check(got, ref)


def test_density_one_with_agreeing_signs_is_the_mean(rng):
    pre = _tree(rng)
    taus = [
        jax.tree.map(lambda x: jnp.abs(x) + 0.1 if ct.is_float(x) else x, _tree(rng))
        for _ in range(3)
    ]
    got = ties(pre, taus, density=1.0)
    for p, x in ct.leaves_with_paths(got):
        if ct.is_float(x):
            mean = np.mean([np.asarray(dict(ct.leaves_with_paths(t))[p]) for t in taus], axis=0)
            np.testing.assert_allclose(
                x, np.asarray(dict(ct.leaves_with_paths(pre))[p]) + mean, rtol=1e-6, err_msg=p
            )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("majority", [1.0, -1.0])
def test_sign_election_hand_example(majority, dtype):
    # Coordinate 0: votes 1, -2, 0.5 sum to -0.5 -> negative; only -2 agrees.
    # Coordinate 1: 1, -1, 0 sum to 0 -> takes the majority sign of the other coordinates.
    # Coordinates 2, 3 set the majority: both elected with sign `majority`.
    m = majority
    # (Coordinate 1 is the exact cancellation the first, marked merge leaves to a second.)
    taus = [
        {"w": jnp.array([1.0, 1.0, 3 * m, 2 * m], dtype)},
        {"w": jnp.array([-2.0, -1.0, 3 * m, -1 * m], dtype)},
        {"w": jnp.array([0.5, 0.0, 3 * m, 0.0], dtype)},
    ]
    pre = {"w": jnp.zeros(4, dtype)}
    got = ties(pre, taus, density=1.0, merge="mean")
    assert got["w"].dtype == dtype
    np.testing.assert_allclose(np.asarray(got["w"], np.float32), [-2.0, m, 3 * m, 2 * m])
    got = ties(pre, taus, density=1.0, merge="sum", scale=0.5)
    np.testing.assert_allclose(np.asarray(got["w"], np.float32), [-1.0, 0.5 * m, 4.5 * m, 1.0 * m])


def test_non_finite_input_takes_the_unmarked_merge(rng):
    # A NaN in the output looks like a tie's mark, so the merge is redone without marks:
    # the NaN stays where the input put it and every other entry is exact.
    pre = _tree(rng)
    pre["enc"]["bias"] = pre["enc"]["bias"].at[2].set(jnp.nan)
    taus = [_tree(rng) for _ in range(3)]
    # One exact cancellation as well, elected by the majority of the finite entries.
    taus[0]["enc"]["kernel"] = taus[0]["enc"]["kernel"].at[0, 0].set(50.0)
    taus[1]["enc"]["kernel"] = taus[1]["enc"]["kernel"].at[0, 0].set(-50.0)
    taus[2]["enc"]["kernel"] = taus[2]["enc"]["kernel"].at[0, 0].set(0.0)
    ref = _reference(pre, taus, density=0.5, scale=1.0, merge="mean", scope="global")
    # Eagerly the second round is its own computation, run because the first was not
    # finite; under jit it is a loop inside the one computation. Both must give the same.
    eager = ties(pre, taus, density=0.5)
    jitted = jax.jit(lambda p, t: ties(p, t, density=0.5))(pre, taus)
    for got in (eager, jitted):
        assert np.isnan(np.asarray(got["enc"]["bias"])[2])
        _check(got, ref)
        assert not np.isnan(np.asarray(got["enc"]["kernel"])).any()
    chex.assert_trees_all_equal(eager, jitted)


def test_global_and_leaf_scope_differ_where_they_should(rng):
    # "big" holds every large value. Globally density 0.5 of 20 keeps int(10) + 1 = 11
    # entries (the paper's code keeps one more than density * N): all of "big" and the
    # largest of "small"; per leaf (mergekit), int(5) = 5 of each.
    pre = {"big": jnp.zeros((10,)), "small": jnp.zeros((10,))}
    taus = [
        {
            "big": jnp.asarray(rng.uniform(10, 20, 10), jnp.float32),
            "small": jnp.asarray(rng.uniform(0.01, 0.02, 10), jnp.float32),
        }
    ]
    glob = ties(pre, taus, density=0.5, scope="global")
    leaf = ties(pre, taus, density=0.5, scope="leaf")
    small = np.asarray(taus[0]["small"])
    np.testing.assert_array_equal(glob["small"], np.where(small == small.max(), small, 0))
    np.testing.assert_array_equal(glob["big"], taus[0]["big"])
    assert int((np.asarray(leaf["small"]) != 0).sum()) == 5
    assert int((np.asarray(leaf["big"]) != 0).sum()) == 5


def test_threshold_ties_are_kept():
    # density 0.4 of 5 entries: k = 2, the 2nd largest magnitude is 2, held by three entries.
    taus = [{"w": jnp.array([3.0, -2.0, 2.0, 2.0, 1.0])}]
    got = ties({"w": jnp.zeros(5)}, taus, density=0.4)
    np.testing.assert_array_equal(got["w"], [3.0, -2.0, 2.0, 2.0, 0.0])


# (N, density): the counts of each reference, worked by hand. round(N * density) matches
# neither: 1 for (3, 0.2), 1 for (5, 0.2), 4 for (7, 0.5), 3 for (5, 0.5), 2 for (10, 0.2).
_COUNTS = [
    # N, density, paper's global count (N - kthvalue rank + 1), mergekit's per-leaf count
    (3, 0.2, 1, 0),
    (5, 0.2, 2, 1),
    (7, 0.2, 2, 1),
    (3, 0.5, 2, 1),
    (5, 0.5, 3, 2),
    (7, 0.5, 4, 3),
    (10, 0.2, 3, 2),
    (10, 0.7, 8, 7),  # 10 * 0.7 = 7.000000000000001 in floats
    (4, 1.0, 4, 4),
]


@pytest.mark.parametrize("n,density,paper,mergekit", _COUNTS)
def test_keep_count_follows_each_reference(rng, n, density, paper, mergekit):
    assert _common.keep_count(density, n, scope="global") == paper
    assert _common.keep_count(density, n, scope="leaf") == mergekit
    # ... and so do the literal re-implementations the merge tests compare against.
    flat = rng.normal(size=(2, n))
    np.testing.assert_array_equal(_paper_mask(flat, density).sum(1), [paper, paper])
    np.testing.assert_array_equal(_mergekit_mask(flat, density).sum(1), [mergekit, mergekit])


def test_keep_count_is_one_function():
    assert kernels._ties_merge.keep_count is _common.keep_count
    assert _streaming.keep_count is _common.keep_count


def test_keep_count_bad_inputs():
    with pytest.raises(ValueError, match="scope='layer' must be one of"):
        _common.keep_count(0.2, 10, scope="layer")
    with pytest.raises(ValueError, match=r"density=0 must be in \(0, 1\]"):
        _common.keep_count(0, 10, scope="leaf")
    with pytest.raises(ValueError, match="n=-1 must be a non-negative int"):
        _common.keep_count(0.2, -1, scope="global")


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "leaf"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_small_leaves_follow_each_reference(rng, scope, density):
    # Leaves of 3, 5 and 7 entries, where round(density * N) and int(density * N) differ;
    # per leaf at density 0.2 the 3-entry leaf keeps nothing (int(0.6) = 0): theta0.
    shapes = {"a": (3,), "b": (5,), "c": (7,)}
    pre = {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}
    taus = [
        {p: jnp.asarray(rng.normal(size=s), jnp.float32) for p, s in shapes.items()}
        for _ in range(3)
    ]
    for merge in ("mean", "sum"):
        ref = _reference(pre, taus, density=density, scale=0.8, merge=merge, scope=scope)
        eager = ties(pre, taus, density=density, scale=0.8, merge=merge, scope=scope)
        jitted = jax.jit(
            lambda p, t, m=merge: ties(p, t, density=density, scale=0.8, merge=m, scope=scope)
        )(pre, taus)
        _check(eager, ref)
        _check(jitted, ref)
    if scope == "leaf" and density == 0.2:
        np.testing.assert_array_equal(eager["a"], pre["a"])


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_kernel_ties_keeps_the_papers_count(rng, impl):
    # 15 entries at density 0.2: the paper's code keeps int(3) + 1 = 4 per task.
    pre = {"a": jnp.zeros((3,)), "b": jnp.zeros((5,)), "c": jnp.zeros((7,))}
    taus = [{p: jnp.asarray(rng.normal(size=x.shape), jnp.float32) for p, x in pre.items()}]
    got = kernels.ties(pre, taus, density=0.2, implementation=impl)
    assert sum(int((np.asarray(x) != 0).sum()) for x in got.values()) == 4
    _check(got, _reference(pre, taus, density=0.2, scale=1.0, merge="mean", scope="global"))


def test_scale_zero_returns_pretrained(rng):
    pre = _tree(rng)
    got = ties(pre, [_tree(rng), _tree(rng)], scale=0.0)
    chex.assert_trees_all_equal(got, pre)


@pytest.mark.slow
def test_jit_and_no_jit_agree(rng):
    pre = _tree(rng)
    taus = ct.stack([_tree(rng) for _ in range(3)])
    eager = ties(pre, taus, density=0.3, scale=1.2)
    jitted = jax.jit(lambda p, t, s: ties(p, t, density=0.3, scale=s))(pre, taus, 1.2)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)


def test_bfloat16_stays_bfloat16(rng):
    pre = _tree(rng, jnp.bfloat16)
    taus = [_tree(rng, jnp.bfloat16) for _ in range(3)]
    got = ties(pre, taus, density=0.3, merge="sum", scale=0.3)
    up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32) if ct.is_float(x) else x, t)
    f32 = ties(up(pre), [up(t) for t in taus], density=0.3, merge="sum", scale=0.3)
    for (p, g), r in zip(ct.leaves_with_paths(got), jax.tree.leaves(f32), strict=True):
        if ct.is_float(g):
            assert g.dtype == jnp.bfloat16, p
            np.testing.assert_allclose(
                np.asarray(g, np.float32), np.asarray(r), rtol=1e-2, atol=1e-2
            )


def test_nnx_state():
    from flax import nnx

    pre = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Param)
    taus = [
        jax.tree.map(
            lambda a, b: b - a, pre, nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(i)), nnx.Param)
        )
        for i in (1, 2, 3)
    ]
    got = ties(pre, taus, density=0.5)
    assert isinstance(got, nnx.State)
    _check(got, _reference(pre, taus, density=0.5, scale=1.0, merge="mean", scope="global"))


def test_bad_inputs(rng):
    pre = _tree(rng)
    taus = [_tree(rng)]
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density=.* must be in \(0, 1\]"):
            ties(pre, taus, density=density)
    with pytest.raises(ValueError, match="merge='max' must be one of"):
        ties(pre, taus, merge="max")
    with pytest.raises(ValueError, match="scope='layer' must be one of"):
        ties(pre, taus, scope="layer")
    with pytest.raises(ValueError, match="empty list"):
        ties(pre, [])
    bad = _tree(rng)
    bad["enc"]["kernel"] = bad["enc"]["kernel"].at[2, 1].set(jnp.nan)
    with pytest.raises(
        ValueError, match=r"task_vectors\[1\] has 1 non-finite value\(s\) at path 'enc/kernel'"
    ):
        ties(pre, [_tree(rng), bad], check_finite=True)
    wrong = _tree(rng)
    wrong["head"]["kernel"] = jnp.zeros((3, 5))
    with pytest.raises(ValueError, match="shape mismatch at path 'head/kernel'"):
        ties(pre, [wrong])
