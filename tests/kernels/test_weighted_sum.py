import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import SHAPES, TOL, tree, where_params

from cljax import kernels
from cljax import tree as ct
from cljax.kernels import _dispatch
from cljax.kernels._weighted_sum import pallas as weighted_sum_pallas


def _np_weighted_sum(base, tau, coeffs, groups=None):
    """Independent reference: float64 numpy, one explicit gather per task."""
    tau = np.asarray(tau, np.float64)
    out = np.zeros(tau.shape[1:]) if base is None else np.asarray(base, np.float64).copy()
    c = np.asarray(coeffs, np.float64)
    for t in range(tau.shape[0]):
        scale = c[t] if groups is None else c[t][np.asarray(groups)]
        out += scale * tau[t]
    return out


def _close(got, want, dtype):
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * 4)


@pytest.mark.slow
@pytest.mark.parametrize("bs", where_params())
@pytest.mark.parametrize(("dtype", "num_tasks"), [(np.float32, 3), (jnp.bfloat16, 8)])
def test_matches_numpy(rng, bs, dtype, num_tasks):
    base = tree(rng, dtype=dtype)
    tvs = tree(rng, (num_tasks,), dtype=dtype, scale=0.1)
    coeffs = {k: jnp.asarray(rng.normal(size=num_tasks), jnp.float32) for k in SHAPES}
    fn = jax.jit(
        lambda b, t, c: kernels.weighted_sum(b, t, c, implementation="pallas", block_sizes=bs)
    )
    got = fn(base, tvs, coeffs)
    ref = kernels.weighted_sum(base, tvs, coeffs, implementation="xla")
    for k in SHAPES:
        want = _np_weighted_sum(base[k], tvs[k], coeffs[k])
        assert got[k].dtype == dtype and got[k].shape == SHAPES[k]
        _close(got[k], want, dtype)
        _close(ref[k], want, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("bs", where_params())
def test_groups_and_no_base(rng, bs):
    num_tasks, k, dtype = 3, 4, jnp.bfloat16
    tvs = tree(rng, (num_tasks,), dtype=dtype)
    groups = [jnp.asarray(rng.integers(0, k, size=s), jnp.int8) for s in SHAPES.values()]
    groups[0] = None  # a leaf without groups takes [T] coefficients
    coeffs = {n: jnp.asarray(rng.normal(size=(num_tasks, k)), jnp.float32) for n in SHAPES}
    coeffs["a"] = jnp.asarray(rng.normal(size=num_tasks), jnp.float32)
    assert list(SHAPES) == [p for p, _ in ct.leaves_with_paths(coeffs)]
    fn = jax.jit(
        lambda t, c, g: kernels.weighted_sum(
            None, t, c, groups=g, implementation="pallas", block_sizes=bs
        )
    )
    got = fn(tvs, coeffs, groups)
    for i, n in enumerate(SHAPES):
        want = _np_weighted_sum(None, tvs[n], coeffs[n], groups[i])
        assert got[n].dtype == dtype
        _close(got[n], want, dtype)


@pytest.mark.parametrize("bs", where_params())
def test_every_output_entry_is_written(rng, bs):
    """Two leaves in one kernel; outputs start as NaN (aliased): a skipped block stays NaN."""
    bs = _dispatch.block_sizes_or_default(bs)
    num_tasks, shapes = 3, [SHAPES["w"], SHAPES["v"]]
    tls = [_dispatch.tiling(int(np.prod(s)), bs) for s in shapes]
    assert tls[0].padded and tls[0].num_blocks > 1
    bases = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    taus = [jnp.asarray(rng.normal(size=(num_tasks, *s)), jnp.bfloat16) for s in shapes]
    cs = [jnp.asarray(rng.normal(size=num_tasks), jnp.float32) for _ in shapes]
    poison = [jnp.full((tl.rows, tl.lanes), jnp.nan, jnp.float32) for tl in tls]
    outs, _ = jax.jit(
        lambda b, t, c, p: weighted_sum_pallas.chunk(
            b, t, c, [None, None], [None, None], [jnp.float32] * 2, bs, poison=p
        )
    )(bases, taus, cs, poison)
    for out, tl, s, b, t, c in zip(outs, tls, shapes, bases, taus, cs, strict=True):
        assert out.shape == (tl.rows, tl.lanes)
        chex.assert_tree_all_finite(out)
        _close(_dispatch.from_tiles(out, tl, s), _np_weighted_sum(b, t, c), np.float32)
        np.testing.assert_array_equal(np.asarray(out).reshape(-1)[tl.size :], 0.0)  # padding


@pytest.mark.slow
@pytest.mark.parametrize("bs", where_params())
def test_gradients(rng, bs):
    """d/dc is <g, τ_t> (the block_dots kernel); d/dθ0 and d/dτ match plain autodiff."""
    num_tasks, k = 2, 2
    shape = (130, 129)  # 3 blocks, padded
    base = jnp.asarray(rng.normal(size=shape), jnp.float32)
    tau = jnp.asarray(rng.normal(size=(num_tasks, *shape)), jnp.float32)
    groups = jnp.asarray(rng.integers(0, k, size=shape), jnp.int32)
    coeffs = jnp.asarray(rng.normal(size=(num_tasks, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(base, tau, c, impl):
        out = kernels.weighted_sum_leaf(base, tau, c, groups, implementation=impl, block_sizes=bs)
        return jnp.sum(w * jnp.sin(out))

    def plain(base, tau, c):
        scale = jnp.stack([c[t][groups] for t in range(num_tasks)])
        return jnp.sum(w * jnp.sin(base + jnp.sum(scale * tau, axis=0)))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(base, tau, coeffs, "pallas")
    want = jax.grad(plain, argnums=(0, 1, 2))(base, tau, coeffs)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    # Only the coefficients differentiated: the same cotangent, nothing else computed.
    dc = jax.jit(jax.grad(loss, argnums=2), static_argnums=3)(base, tau, coeffs, "xla")
    chex.assert_trees_all_close(dc, want[2], rtol=1e-4, atol=1e-4)


def test_default_dispatch_is_xla_on_cpu(rng):
    assert _dispatch.resolve(None, where="test") == (
        "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    )
    base, tvs = tree(rng), tree(rng, (2,))
    c = jnp.asarray([0.3, -0.7], jnp.float32)
    got = kernels.weighted_sum(base, tvs, c)  # one [T] array shared by every leaf
    for k in SHAPES:
        _close(got[k], _np_weighted_sum(base[k], tvs[k], c), np.float32)


def test_list_of_trees_and_structure_errors(rng):
    base = tree(rng)
    tvs = [tree(rng), tree(rng)]
    c = jnp.ones(2)
    chex.assert_trees_all_close(
        kernels.weighted_sum(base, tvs, c),
        kernels.weighted_sum(base, jax.tree.map(lambda *x: jnp.stack(x), *tvs), c),
    )
    chex.assert_trees_all_close(  # a scalar λ: the same coefficient for every task
        kernels.weighted_sum(base, tvs, 0.4), kernels.weighted_sum(base, tvs, jnp.full(2, 0.4))
    )
    with pytest.raises(ValueError, match="shape mismatch at path 'w'"):
        kernels.weighted_sum(base, {**tree(rng, (2,)), "w": jnp.ones((2, 3))}, c)
    with pytest.raises(ValueError, match=r"coefficients of shape \(3,\), expected \(2,\)"):
        kernels.weighted_sum(base, tvs, jnp.ones(3))
    with pytest.raises(ValueError, match=r"coefficients must be \[T, K\]"):
        kernels.weighted_sum_leaf(None, jnp.ones((2, 5)), jnp.ones(2), jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="group ids must be integers"):
        kernels.weighted_sum_leaf(None, jnp.ones((2, 5)), jnp.ones((2, 3)), jnp.zeros(5))
    with pytest.raises(ValueError, match="implementation='triton' must be one of"):
        kernels.weighted_sum(base, tvs, c, implementation="triton")


@pytest.mark.slow
def test_wired_into_task_arithmetic_and_atlas(rng):
    """cljax.merging routes through the dispatcher: Pallas equals the XLA code, gradients too."""
    from cljax.merging import atlas, task_arithmetic

    bs_default = _dispatch.BlockSizes.default("cpu")
    assert bs_default.rows >= 256  # few interpret-mode steps for these leaves
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(40, 50)), jnp.float32)}}
    params["dense"]["bias"] = jnp.asarray(rng.normal(size=(50,)), jnp.float32)
    tvs = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(3, *x.shape)), jnp.bfloat16), params)
    got = task_arithmetic(params, tvs, 0.3, implementation="pallas")
    want = task_arithmetic(params, tvs, 0.3, implementation="xla")
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)

    spec = atlas.blocks(params, partitions=2)
    coefs = jax.tree.map(
        lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32), atlas.init(params, tvs, spec)
    )
    masks = atlas.partition_masks(params, spec)

    def loss(c, impl):
        out = atlas.compose(params, tvs, c, spec, masks=masks, implementation=impl)
        return sum(jnp.sum(jnp.cos(x)) for x in jax.tree.leaves(out))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    chex.assert_trees_all_close(grad(coefs, "pallas"), grad(coefs, "xla"), rtol=1e-5, atol=1e-4)


def test_task_arithmetic_and_atlas_are_calls_of_this_op(rng):
    """One weighted sum: the merges give the op's bits, and the op gives numpy's values.

    Compared jitted on both sides: an eager op runs its multiply and add as two programs,
    and XLA may fuse them into one multiply-add inside a program.
    """
    from cljax.merging import atlas, task_arithmetic

    small = {k: SHAPES[k] for k in ("a", "b")}
    base = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in small.items()}
    tvs = {k: jnp.asarray(rng.normal(size=(3, *s)), jnp.bfloat16) for k, s in small.items()}
    op = jax.jit(kernels.weighted_sum)
    lam = 0.3
    merged = jax.jit(task_arithmetic)(base, tvs, lam)
    chex.assert_trees_all_equal(merged, op(base, tvs, jnp.full(3, lam, jnp.float32)))
    spec = atlas.blocks(base)
    coefs = jax.tree.map(lambda c: jnp.asarray(rng.normal(size=c.shape), jnp.float32),
                         atlas.init(base, tvs, spec))  # fmt: skip
    chex.assert_trees_all_equal(
        jax.jit(atlas.compose, static_argnums=3)(base, tvs, coefs, spec), op(base, tvs, coefs)
    )
    for k in small:  # and the op is θ0 + λ·Σ_t τ_t (float32 accumulation)
        _close(merged[k], _np_weighted_sum(base[k], tvs[k], np.full(3, lam)), np.float32)
