import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import SHAPES, tree, where_params

from cljax import kernels
from cljax.kernels import _dispatch
from cljax.kernels._block_dots import pallas as block_dots_pallas


def _np_dots(g, tau, groups=None, k=None):
    """Independent reference: float64 numpy, a bincount per task for groups."""
    g = np.asarray(g, np.float64).reshape(-1)
    tau = np.asarray(tau, np.float64).reshape(tau.shape[0], -1)
    if groups is None:
        return tau @ g
    ids = np.asarray(groups).reshape(-1)
    return np.stack([np.bincount(ids, weights=row * g, minlength=k) for row in tau])


@pytest.mark.slow
@pytest.mark.parametrize("bs", where_params())
@pytest.mark.parametrize(("dtype", "num_tasks"), [(np.float32, 3), (jnp.bfloat16, 8)])
def test_matches_numpy(rng, bs, dtype, num_tasks):
    grads = tree(rng, dtype=np.float32)
    tvs = tree(rng, (num_tasks,), dtype=dtype)
    got = jax.jit(lambda g, t: kernels.block_dots(g, t, implementation="pallas", block_sizes=bs))(
        grads, tvs
    )
    ref = kernels.block_dots(grads, tvs, implementation="xla")
    for n in SHAPES:
        want = _np_dots(grads[n], tvs[n])
        assert got[n].shape == (num_tasks,) and got[n].dtype == jnp.float32
        # float32 sums of ~4e4 products: relative error ~1e-6·sqrt(n) of the sum of |terms|.
        atol = 1e-5 * np.sum(np.abs(np.asarray(grads[n], np.float64)))
        np.testing.assert_allclose(got[n], want, rtol=1e-5, atol=atol)
        np.testing.assert_allclose(ref[n], want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("bs", where_params())
def test_groups(rng, bs):
    num_tasks, k = 3, 5
    shape = SHAPES["w"]
    g = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
    tau = jnp.asarray(rng.normal(size=(num_tasks, *shape)), jnp.bfloat16)
    groups = jnp.asarray(rng.integers(0, k, size=shape), jnp.int8)
    got = jax.jit(
        lambda g, t, i: kernels.block_dots_leaf(
            g, t, i, num_groups=k, implementation="pallas", block_sizes=bs
        )
    )(g, tau, groups)
    want = _np_dots(g, tau, groups, k)
    assert got.shape == (num_tasks, k)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    # Groups partition the entries: summed over k they give the plain dot product.
    np.testing.assert_allclose(got.sum(1), _np_dots(g, tau), rtol=1e-4, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("bs", where_params())
def test_every_block_is_written(rng, bs):
    """Two leaves in one kernel: every program writes its own row, holding its block's dots."""
    bs = _dispatch.block_sizes_or_default(bs)
    num_tasks, shapes = 3, [SHAPES["w"], SHAPES["v"]]
    gs = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    taus = [jnp.asarray(rng.normal(size=(num_tasks, *s)), jnp.float32) for s in shapes]
    parts, tls = jax.jit(
        lambda g, t: block_dots_pallas.chunk(g, t, [None, None], [None, None], bs)
    )(gs, taus)
    assert parts.shape == (sum(tl.num_blocks for tl in tls), 1, 4)
    chex.assert_tree_all_finite(parts)
    row = 0
    for g, tau, tl in zip(gs, taus, tls, strict=True):
        tiles_g = np.asarray(_dispatch.to_tiles(g, tl), np.float64)
        tiles_t = np.asarray(_dispatch.to_tiles(tau, tl, stacked=True), np.float64)
        for b in range(tl.num_blocks):  # the program's row holds exactly its block's dots
            rows = slice(b * tl.block_rows, (b + 1) * tl.block_rows)
            want = np.einsum("trl,rl->t", tiles_t[:, rows], tiles_g[rows])
            np.testing.assert_allclose(parts[row, 0, :num_tasks], want, rtol=1e-5, atol=1e-4)
            row += 1
    np.testing.assert_array_equal(parts[:, 0, num_tasks:], 0.0)
    sums = block_dots_pallas.leaf_sums(parts, tls, 4)  # and the per-leaf totals
    for i, (g, tau) in enumerate(zip(gs, taus, strict=True)):
        t64, g64 = np.asarray(tau, np.float64), np.asarray(g, np.float64)
        want = (t64.reshape(num_tasks, -1) * g64.reshape(-1)).sum(1)
        np.testing.assert_allclose(sums[i, :num_tasks], want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("bs", where_params())
def test_vjp_is_weighted_sum(rng, bs):
    """d/dg Σ_t w_t <g, τ_t> = Σ_t w_t τ_t (the weighted-sum kernel) and d/dτ_t = w_t g."""
    num_tasks, shape = 3, (130, 129)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    tau = jnp.asarray(rng.normal(size=(num_tasks, *shape)), jnp.float32)
    w = jnp.asarray(rng.normal(size=num_tasks), jnp.float32)
    f = lambda g, t: jnp.dot(
        w, kernels.block_dots_leaf(g, t, implementation="pallas", block_sizes=bs)
    )
    dg, dtau = jax.jit(jax.grad(f, argnums=(0, 1)))(g, tau)
    chex.assert_trees_all_close(dg, jnp.einsum("t,t...->...", w, tau), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(dtau, w[:, None, None] * g, rtol=1e-6)


def test_errors():
    g = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"do not stack leaves of shape \(4, 3\)"):
        kernels.block_dots_leaf(g, jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="num_groups=None must be a positive int"):
        kernels.block_dots_leaf(g, jnp.ones((2, 4, 3)), jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="num_groups=2 given without group ids"):
        kernels.block_dots_leaf(g, jnp.ones((2, 4, 3)), num_groups=2)
    with pytest.raises(ValueError, match="groups has 1 entries for 2 leaves"):
        kernels.block_dots(
            {"a": g, "b": g}, {"a": jnp.ones((2, 4, 3))} | {"b": jnp.ones((2, 4, 3))}, groups=[None]
        )
