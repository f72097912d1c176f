import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import tree as ct
from cljax.merging import apply, task_arithmetic, task_vector


def _tree(rng, dtype=np.float32):
    return {
        "enc": {
            "kernel": jnp.asarray(rng.normal(size=(5, 4)), dtype),
            "bias": jnp.asarray(rng.normal(size=(4,)), dtype),
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), dtype)},
        "step": jnp.asarray(rng.integers(0, 9, size=(2,)), jnp.int32),
    }


def _np(tree):
    return {
        p: np.asarray(x, np.float64 if ct.is_float(x) else x.dtype)
        for p, x in ct.leaves_with_paths(tree)
    }


def test_task_vector_is_difference_and_integers_give_zeros(rng):
    pre, ft = _tree(rng), _tree(rng)
    tau = task_vector(ft, pre)
    ref_pre, ref_ft, got = _np(pre), _np(ft), _np(tau)
    for p in ("enc/kernel", "enc/bias", "head/kernel"):
        np.testing.assert_allclose(got[p], ref_ft[p] - ref_pre[p], rtol=1e-6, atol=1e-6)
    assert tau["step"].dtype == jnp.int32
    np.testing.assert_array_equal(got["step"], 0)


def test_task_vector_rules_exclude_leaves(rng):
    pre, ft = _tree(rng), _tree(rng)
    tau = task_vector(ft, pre, rules=[("head", False)])
    np.testing.assert_array_equal(tau["head"]["kernel"], 0)
    assert np.abs(np.asarray(tau["enc"]["kernel"])).min() > 0


def test_apply_and_negation(rng):
    pre, ft = _tree(rng), _tree(rng)
    tau = task_vector(ft, pre)
    back = apply(pre, tau, 1.0)
    chex.assert_trees_all_close(back["enc"], ft["enc"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(back["step"], pre["step"])  # integer leaves keep theta0
    neg = apply(pre, tau, -0.5)
    ref_pre, ref_tau = _np(pre), _np(tau)
    np.testing.assert_allclose(
        neg["enc"]["kernel"],
        ref_pre["enc/kernel"] - 0.5 * ref_tau["enc/kernel"],
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_array_equal(neg["step"], pre["step"])


def _ta_reference(pre, taus, scale, excluded=()):
    ref = _np(pre)
    out = {}
    for p, x in ref.items():
        if x.dtype.kind != "f" or any(e in p for e in excluded):
            out[p] = x
            continue
        total = np.zeros_like(x)
        for tau in taus:  # a Python loop over tasks, float64
            total += _np(tau)[p]
        out[p] = x + scale * total
    return out


@pytest.mark.parametrize("stacked", [False, True])
def test_task_arithmetic_matches_reference(rng, stacked):
    pre = _tree(rng)
    taus = [_tree(rng) for _ in range(3)]
    arg = ct.stack(taus) if stacked else taus
    got = _np(task_arithmetic(pre, arg, 0.3))
    ref = _ta_reference(pre, taus, 0.3)
    for p in ref:
        np.testing.assert_allclose(got[p], ref[p], rtol=1e-5, atol=1e-6, err_msg=p)


def test_task_arithmetic_is_sum_then_scale_not_mean(rng):
    pre = jax.tree.map(jnp.zeros_like, _tree(rng))
    tau = _tree(rng)
    got = task_arithmetic(pre, [tau, tau, tau, tau], 1.0)
    np.testing.assert_allclose(got["enc"]["bias"], 4 * np.asarray(tau["enc"]["bias"]), rtol=1e-6)


def test_task_arithmetic_rules_keep_excluded_leaves(rng):
    pre = _tree(rng)
    taus = [_tree(rng) for _ in range(2)]
    got = task_arithmetic(pre, taus, 0.7, rules=[("^head/", False)])
    np.testing.assert_array_equal(got["head"]["kernel"], pre["head"]["kernel"])
    np.testing.assert_array_equal(got["step"], pre["step"])
    ref = _ta_reference(pre, taus, 0.7, excluded=("head",))
    np.testing.assert_allclose(got["enc"]["kernel"], ref["enc/kernel"], rtol=1e-5, atol=1e-6)


def test_scale_zero_returns_pretrained(rng):
    pre = _tree(rng)
    got = task_arithmetic(pre, [_tree(rng), _tree(rng)], 0.0)
    chex.assert_trees_all_equal(got, pre)


def test_jit_and_no_jit_agree(rng):
    pre = _tree(rng)
    taus = ct.stack([_tree(rng) for _ in range(3)])
    eager = task_arithmetic(pre, taus, 0.4)
    jitted = jax.jit(task_arithmetic)(pre, taus, 0.4)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-6)
    ft = _tree(rng)
    chex.assert_trees_all_close(jax.jit(task_vector)(ft, pre), task_vector(ft, pre), rtol=1e-6)
    chex.assert_trees_all_close(
        jax.jit(apply)(pre, ft, -1.5), apply(pre, ft, -1.5), rtol=1e-6, atol=1e-6
    )


def test_bfloat16_stays_bfloat16_with_float32_accumulation():
    # Eight task vectors of 2**-9 on a pretrained 1.0: accumulated in bfloat16, every
    # 1 + 2**-9 rounds back to 1; in float32 the sum 2**-6 survives, and 1 + 2**-6 is a
    # bfloat16 number.
    pre = {"w": jnp.ones((3,), jnp.bfloat16)}
    taus = [{"w": jnp.full((3,), 2.0**-9, jnp.bfloat16)} for _ in range(8)]
    got = task_arithmetic(pre, taus, 1.0)
    assert got["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["w"], np.float32), 1 + 2.0**-6)


def test_bfloat16_matches_float32_computation(rng):
    pre = _tree(rng, jnp.bfloat16)
    taus = [_tree(rng, jnp.bfloat16) for _ in range(3)]
    got = task_arithmetic(pre, taus, 0.3)
    f32 = task_arithmetic(
        *jax.tree.map(lambda x: x.astype(jnp.float32) if ct.is_float(x) else x, (pre, taus)), 0.3
    )
    for (p, g), (_, r) in zip(ct.leaves_with_paths(got), ct.leaves_with_paths(f32), strict=True):
        if ct.is_float(g):
            assert g.dtype == jnp.bfloat16, p
            np.testing.assert_allclose(
                np.asarray(g, np.float32), np.asarray(r), rtol=1e-2, atol=1e-2
            )


def test_linen_params_dict():
    import flax.linen as nn

    model = nn.Dense(3)
    x = jnp.ones((1, 4))
    pre = model.init(jax.random.key(0), x)
    fts = [model.init(jax.random.key(i), x) for i in (1, 2)]
    taus = [task_vector(ft, pre) for ft in fts]
    merged = task_arithmetic(pre, taus, 0.5)
    expected = jax.tree.map(lambda p, a, b: p + 0.5 * ((a - p) + (b - p)), pre, *fts)
    chex.assert_trees_all_close(merged, expected, rtol=1e-5, atol=1e-6)
    model.apply(merged, x)


def test_nnx_state():
    from flax import nnx

    def make(seed):
        return nnx.Linear(4, 3, rngs=nnx.Rngs(seed))

    pre = nnx.state(make(0), nnx.Param)
    fts = [nnx.state(make(i), nnx.Param) for i in (1, 2)]
    taus = [task_vector(ft, pre) for ft in fts]
    merged = task_arithmetic(pre, taus, 0.5)
    assert isinstance(merged, nnx.State)
    for (p, m), a, b, c in zip(
        ct.leaves_with_paths(merged), *(jax.tree.leaves(t) for t in (pre, *fts)), strict=True
    ):
        np.testing.assert_allclose(
            m, a + 0.5 * ((b - a) + (c - a)), rtol=1e-5, atol=1e-6, err_msg=p
        )
    model = make(0)
    nnx.update(model, merged)
    np.testing.assert_allclose(model.kernel[...], merged["kernel"][...], rtol=0)


def test_errors_name_the_place(rng):
    pre = _tree(rng)
    with pytest.raises(ValueError, match="empty list"):
        task_arithmetic(pre, [])
    bad = _tree(rng)
    bad["enc"]["bias"] = jnp.zeros((5,))
    with pytest.raises(ValueError, match=r"shape mismatch at path 'enc/bias'"):
        task_arithmetic(pre, [_tree(rng), bad])
    missing = _tree(rng)
    del missing["head"]
    with pytest.raises(ValueError, match=r"task_vectors\[0\] has no leaf at path 'head/kernel'"):
        task_arithmetic(pre, [missing])
    with pytest.raises(ValueError, match="finetuned has no leaf at path 'head/kernel'"):
        task_vector(missing, pre)
    with pytest.raises(ValueError, match="leading"):
        task_arithmetic(pre, {**ct.stack([pre, pre]), "step": jnp.zeros((3, 2), jnp.int32)})
