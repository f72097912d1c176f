"""Tests of cljax.merging.atlas: blocks, compose (and its custom gradient), init, fit."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import tree as ct
from cljax.merging import atlas

QKV = (r"(.*)/(query|key|value)/kernel$", r"\1/qkv")


def _params(rng, dtype=np.float32):
    def a(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return {
        "embed": {"conv": a(2, 2, 1, 3), "pos": a(5, 3)},
        "layer_0": {
            "query": {"kernel": a(3, 4), "bias": a(4)},
            "key": {"kernel": a(3, 4), "bias": a(4)},
            "value": {"kernel": a(3, 4), "bias": a(4)},
            "ln": {"scale": a(3)},
        },
        "count": jnp.asarray(7, jnp.int32),
    }


def _task_vectors(rng, params, t, dtype=np.float32):
    def tv(x):
        if not ct.is_float(x):
            return jnp.zeros((t, *x.shape), x.dtype)
        return jnp.asarray(rng.normal(size=(t, *x.shape)), dtype)

    return jax.tree.map(tv, params)


def _random_coefs(rng, coefs, dtype=np.float32):
    return jax.tree.map(lambda c: jnp.asarray(rng.normal(size=c.shape), dtype), coefs)


def _reference(params, tvs, coefs, spec, masks=None):
    """Slow numpy reference: per leaf, per task, per entry."""
    flat = {p: np.asarray(c, np.float64) for p, c in ct.leaves_with_paths(coefs)}
    taus = [np.asarray(x, np.float64) for x in jax.tree.leaves(tvs)]
    out = []
    for i, ((_, x), tau) in enumerate(zip(ct.leaves_with_paths(params), taus, strict=True)):
        b = spec.block_of[i]
        if b < 0:
            out.append(np.asarray(x))
            continue
        lam = flat[spec.names[b]]
        theta = np.asarray(x, np.float64).copy()
        for t in range(tau.shape[0]):
            if spec.partitioned[b]:
                m = masks[i]
                for idx in np.ndindex(theta.shape):
                    theta[idx] += lam[t, m[idx]] * tau[t][idx]
            else:
                theta += lam[t] * tau[t]
        out.append(theta)
    return jax.tree.unflatten(jax.tree.structure(params), out)


# ----------------------------------------------------------------------------- blocks


def test_default_blocks_one_per_float_leaf(rng):
    params = _params(rng)
    spec = atlas.blocks(params)
    float_paths = [p for p, x in ct.leaves_with_paths(params) if ct.is_float(x)]
    assert list(spec.names) == float_paths
    assert spec.block_of[spec.paths.index("count")] == -1
    coefs = atlas.init(params, _task_vectors(rng, params, 3), spec)
    # Dict params: the coefficients have the parameters' structure (minus int leaves).
    assert ct.paths(coefs) == float_paths
    chex.assert_trees_all_equal_shapes(coefs, jax.tree.map(lambda p: jnp.zeros(3), coefs))
    assert spec.num_coefficients(3) == 3 * len(float_paths)


def _clip_params():
    from cljax.models import clip

    vision = clip.CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2
    )
    text = clip.CLIPTextConfig(
        vocab_size=10,
        max_position_embeddings=4,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
    )
    encoder = clip.CLIPImageEncoder(clip.CLIPConfig(vision, text, projection_dim=4))
    return jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]


def test_clip_qkv_groups_match_the_hugging_face_layout():
    params = _clip_params()
    spec = atlas.blocks(params, groups=atlas.CLIP_QKV_GROUPS)
    for i in range(2):
        attn = f"vision_model/encoder/layers_{i}/self_attn"
        assert spec.members(f"{attn}/qkv_kernel") == [
            f"{attn}/{n}_proj/kernel" for n in ("k", "q", "v")
        ]
        assert spec.members(f"{attn}/qkv_bias") == [
            f"{attn}/{n}_proj/bias" for n in ("k", "q", "v")
        ]
        assert spec.members(f"{attn}/out_proj/kernel") == [f"{attn}/out_proj/kernel"]
    # Every other leaf stays its own block: 4 fewer blocks a layer than leaves.
    assert spec.num_blocks == len(jax.tree.leaves(params)) - 2 * 4
    coefs = atlas.init(params, jax.tree.map(lambda x: jnp.zeros((3, *x.shape)), params), spec)
    assert coefs["vision_model"]["encoder"]["layers_0"]["self_attn"]["qkv_kernel"].shape == (3,)


def test_groups_tie_leaves_and_exclude_wins(rng):
    params = _params(rng)
    spec = atlas.blocks(params, groups=[QKV], exclude=[r"/ln/"])
    assert "layer_0/qkv" in spec.names
    assert spec.members("layer_0/qkv") == [
        "layer_0/key/kernel",
        "layer_0/query/kernel",
        "layer_0/value/kernel",
    ]
    assert spec.block_of[spec.paths.index("layer_0/ln/scale")] == -1
    coefs = atlas.init(params, _task_vectors(rng, params, 2), spec)
    assert coefs["layer_0"]["qkv"].shape == (2,)
    assert "ln" not in coefs["layer_0"]
    assert "layer_0/qkv" in spec.describe()


def test_grouped_leaves_share_one_coefficient(rng):
    params = _params(rng)
    tvs = _task_vectors(rng, params, 2)
    spec = atlas.blocks(params, groups=[QKV])
    coefs = atlas.init(params, tvs, spec)
    coefs["layer_0"]["qkv"] = jnp.array([0.5, -2.0])
    theta = atlas.compose(params, tvs, coefs, spec)
    for name in ("query", "key", "value"):
        want = (
            params["layer_0"][name]["kernel"]
            + 0.5 * tvs["layer_0"][name]["kernel"][0]
            - 2.0 * tvs["layer_0"][name]["kernel"][1]
        )
        np.testing.assert_allclose(theta["layer_0"][name]["kernel"], want, rtol=1e-6, atol=1e-6)
    # The shared coefficient's gradient is the sum of its members' dot products.
    w = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    loss = lambda c: sum(
        jnp.sum(a * b)
        for a, b in zip(
            jax.tree.leaves(atlas.compose(params, tvs, c, spec)), jax.tree.leaves(w), strict=True
        )
        if ct.is_float(a)
    )
    g = jax.jit(jax.grad(loss))(coefs)["layer_0"]["qkv"]
    want = sum(
        jnp.einsum("t...,...->t", tvs["layer_0"][n]["kernel"], w["layer_0"][n]["kernel"])
        for n in ("query", "key", "value")
    )
    np.testing.assert_allclose(g, want, rtol=1e-5)


def test_partition_masks_deterministic_and_exclusive(rng):
    params = {"w": jnp.zeros((40, 30)), "b": jnp.zeros(30), "v": jnp.zeros((20, 10))}
    spec = atlas.blocks(params, partitions=4, seed=3)
    m1, m2 = atlas.partition_masks(params, spec), atlas.partition_masks(params, spec)
    other = atlas.partition_masks(params, atlas.blocks(params, partitions=4, seed=4))
    paths = ct.paths(params)
    for p, a, b, c in zip(paths, m1, m2, other, strict=True):
        if p == "b":  # non-2-D: not partitioned under the default scope
            assert a is None
            continue
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        onehot = np.stack([a == k for k in range(4)])
        np.testing.assert_array_equal(onehot.sum(0), 1)  # every entry in exactly one group
        assert onehot.reshape(4, -1).any(1).all()  # and every group is used
    # Leaves of different shapes draw independent masks.
    assert not np.array_equal(m1[paths.index("v")], m1[paths.index("w")][:20, :10])


def _reference_sharing(params, partitions):
    """The reference's ``WeightedImageEncoder.__init__`` literally: for every tensor in
    order, draw a mask and store it under ``mask_mats[p.shape]`` (a later tensor of the
    same shape overwrites it); the forward pass reads ``mask_mats[shape]``. Returns, per
    leaf, the identity of the mask it ends up using."""
    mask_mats = {}
    shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
    for shape in shapes:
        mask_mats[shape] = object()  # a fresh draw
    return [mask_mats[shape] for shape in shapes]


def test_partition_masks_drawn_once_per_shape(rng):
    a = lambda *s: jnp.zeros(s)
    params = {
        "l0": {"w": a(6, 5), "u": a(5, 6)},
        "l1": {"w": a(6, 5), "u": a(5, 6)},
        "pos": a(6, 5),
        "big": a(7, 9),
    }
    spec = atlas.blocks(params, partitions=3, seed=2)
    masks = atlas.partition_masks(params, spec)
    ref = _reference_sharing(params, 3)
    n = len(masks)
    for i in range(n):
        for j in range(n):
            same = np.shape(masks[i]) == np.shape(masks[j]) and np.array_equal(masks[i], masks[j])
            assert same == (ref[i] is ref[j]), (spec.paths[i], spec.paths[j])
    # A shape's draw does not depend on the other leaves of the tree.
    alone = {"x": a(6, 5)}
    only = atlas.partition_masks(alone, atlas.blocks(alone, partitions=3, seed=2))[0]
    np.testing.assert_array_equal(only, masks[spec.paths.index("l0/w")])


def test_grouped_qkv_partition_like_the_packed_tensor(rng):
    # q, k, v of one layer are one block, the counterpart of open_clip's packed (3d, d)
    # in_proj_weight: independent entries inside the block, the same draw in every layer.
    a = lambda *s: jnp.zeros(s)
    layer = {n: {"kernel": a(4, 4), "bias": a(4)} for n in ("query", "key", "value")}
    params = {"layer_0": layer, "layer_1": layer, "out": {"kernel": a(4, 4)}}
    spec = atlas.blocks(params, partitions=4, groups=atlas.VIT_QKV_GROUPS, seed=5)
    masks = dict(zip(spec.paths, atlas.partition_masks(params, spec), strict=True))
    for n in ("query", "key", "value"):
        np.testing.assert_array_equal(masks[f"layer_0/{n}/kernel"], masks[f"layer_1/{n}/kernel"])
        assert masks[f"layer_0/{n}/bias"] is None  # 1-D: one coefficient per task vector
    q, k = masks["layer_0/query/kernel"], masks["layer_0/key/kernel"]
    assert not np.array_equal(q, k)
    assert not np.array_equal(masks["out/kernel"], q)  # a single (d, d) leaf: its own draw


@pytest.mark.parametrize(
    "scope,want",
    [
        ("2d", {"embed/pos": (2, 3), "embed/conv": (2,), "layer_0/query/bias": (2,)}),
        ("all", {"embed/pos": (2, 3), "embed/conv": (2, 3), "layer_0/query/bias": (2, 3)}),
        ("2d_only", {"embed/pos": (2, 3)}),
    ],
)
def test_partition_scopes(rng, scope, want):
    params = _params(rng)
    spec = atlas.blocks(params, partitions=3, partition_scope=scope)
    coefs = atlas.init(params, _task_vectors(rng, params, 2), spec)
    flat = {p: c.shape for p, c in ct.leaves_with_paths(coefs)}
    for p, shape in want.items():
        assert flat[p] == shape
    if scope == "2d_only":  # the reference: non-2-D tensors get no contribution
        assert "embed/conv" not in flat and "layer_0/query/bias" not in flat


# ----------------------------------------------------------------------------- compose


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"groups": [QKV], "exclude": [r"ln"]}, {"partitions": 3, "seed": 1}],
    ids=["per_leaf", "groups", "partitions"],
)
def test_compose_matches_slow_reference(rng, kwargs):
    params = _params(rng)
    tvs = _task_vectors(rng, params, 3)
    spec = atlas.blocks(params, **kwargs)
    coefs = _random_coefs(rng, atlas.init(params, tvs, spec))
    masks = atlas.partition_masks(params, spec)
    got = atlas.compose(params, tvs, coefs, spec)
    want = _reference(params, tvs, coefs, spec, masks)
    chex.assert_trees_all_close(
        got, jax.tree.map(lambda w, g: w.astype(g.dtype), want, got), rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_equal_dtypes(got, params)


def test_list_of_task_vectors_equals_stacked(rng):
    params = _params(rng)
    tvs = _task_vectors(rng, params, 2)
    coefs = _random_coefs(rng, atlas.init(params, tvs))
    chex.assert_trees_all_close(
        atlas.compose(params, ct.unstack(tvs), coefs), atlas.compose(params, tvs, coefs)
    )


def test_zero_coefficients_give_pretrained(rng):
    params = _params(rng)
    tvs = _task_vectors(rng, params, 4)
    for spec in (atlas.blocks(params), atlas.blocks(params, partitions=2, groups=[QKV])):
        theta = atlas.compose(params, tvs, atlas.init(params, tvs, spec), spec)
        chex.assert_trees_all_equal(theta, params)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [True, False])
def test_jit_and_eager_agree(rng, jit):
    params = _params(rng)
    tvs = _task_vectors(rng, params, 2)
    spec = atlas.blocks(params, partitions=2, groups=[QKV])
    coefs = _random_coefs(rng, atlas.init(params, tvs, spec))
    masks = atlas.partition_masks(params, spec)

    def value_and_grad(p, t, c, m):
        loss = lambda c: sum(
            jnp.sum(jnp.sin(x))
            for x in jax.tree.leaves(atlas.compose(p, t, c, spec, masks=m))
            if ct.is_float(x)
        )
        return jax.value_and_grad(loss)(c)

    fn = jax.jit(chex.assert_max_traces(value_and_grad, n=1)) if jit else value_and_grad
    got = fn(params, tvs, coefs, masks)
    got2 = fn(params, tvs, coefs, masks)  # no retrace under jit
    ref = value_and_grad(params, tvs, coefs, None)  # masks computed inside: same values
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got, got2)
    want = _reference(params, tvs, coefs, spec, masks)
    composed = (jax.jit(atlas.compose, static_argnums=3) if jit else atlas.compose)(
        params, tvs, coefs, spec, masks=masks
    )
    chex.assert_trees_all_close(
        composed, jax.tree.map(lambda w, g: w.astype(g.dtype), want, composed), rtol=1e-5, atol=1e-5
    )


def _naive_compose(params, tvs, coefs, spec, masks):
    """Plain autodiff-able composition (no custom_vjp), written leaf by leaf with one-hots."""
    flat = dict(ct.leaves_with_paths(coefs))
    out = []
    for i, (x, tau) in enumerate(zip(jax.tree.leaves(params), jax.tree.leaves(tvs), strict=True)):
        b = spec.block_of[i]
        if b < 0:
            out.append(x)
            continue
        lam = flat[spec.names[b]]
        if spec.partitioned[b]:
            onehot = jax.nn.one_hot(masks[i], spec.partitions, dtype=x.dtype)  # [..., K]
            scale = jnp.einsum("tk,...k->t...", lam, onehot)
        else:
            scale = lam.reshape((-1,) + (1,) * x.ndim)
        out.append(x + jnp.sum(scale * tau.astype(x.dtype), axis=0))
    return jax.tree.unflatten(jax.tree.structure(params), out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [{"groups": [QKV]}, {"partitions": 3, "partition_scope": "all", "groups": [QKV]}],
    ids=["blockwise", "partitions"],
)
def test_custom_gradient_matches_autodiff_float64(rng, kwargs):
    with jax.enable_x64(True):
        params = _params(rng, np.float64)
        del params["count"]  # jax.grad over θ0 needs float leaves only
        tvs = _task_vectors(rng, params, 3, np.float64)
        spec = atlas.blocks(params, **kwargs)
        coefs = _random_coefs(rng, atlas.init(params, tvs, spec, dtype=jnp.float64), np.float64)
        masks = atlas.partition_masks(params, spec)
        w = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=np.shape(x))), params)

        def loss(compose_fn, p, t, c):
            theta = compose_fn(p, t, c, spec, masks)
            # A non-linear loss so that dL/dθ depends on θ.
            return sum(
                jnp.sum(jnp.tanh(a) * b) + 0.1 * jnp.sum(a**2)
                for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(w), strict=True)
                if ct.is_float(a)
            )

        ours = lambda p, t, c, s, m: atlas.compose(p, t, c, s, masks=m)
        f = lambda fn: jax.grad(lambda p, t, c: loss(fn, p, t, c), argnums=(0, 1, 2))
        got = jax.jit(f(ours))(params, tvs, coefs)
        want = jax.jit(f(_naive_compose))(params, tvs, coefs)
        for g_got, g_want in zip(got, want, strict=True):
            for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
                if not ct.is_float(b):
                    continue
                assert a.dtype == jnp.float64
                err = np.linalg.norm(np.asarray(a) - np.asarray(b))
                assert err <= 1e-6 * max(np.linalg.norm(np.asarray(b)), 1e-30), err
        # Only Λ asked for: same Λ gradient.
        g_lam = jax.jit(jax.grad(lambda c: loss(ours, params, tvs, c)))(coefs)
        chex.assert_trees_all_close(g_lam, want[2], rtol=1e-10)


def test_bfloat16_task_vectors_accumulate_in_float32(rng):
    params = _params(rng)
    tvs32 = _task_vectors(rng, params, 4)
    tvs16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if ct.is_float(x) else x, tvs32)
    spec = atlas.blocks(params)
    coefs = _random_coefs(rng, atlas.init(params, tvs16, spec))
    got = atlas.compose(params, tvs16, coefs, spec)
    chex.assert_trees_all_equal_dtypes(got, params)
    # Reference: float64 sum of the bf16-rounded vectors; float32 accumulation keeps 1e-6.
    want = _reference(params, jax.tree.map(lambda x: np.asarray(x, np.float64), tvs16), coefs, spec)
    chex.assert_trees_all_close(
        got, jax.tree.map(lambda w, g: w.astype(g.dtype), want, got), rtol=1e-5, atol=1e-5
    )
    # bf16 pretrained: output stays bf16, equal to the float32 result rounded once.
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if ct.is_float(x) else x, params)
    got16 = atlas.compose(p16, tvs16, coefs, spec)
    chex.assert_trees_all_equal_dtypes(got16, p16)
    ref16 = atlas.compose(
        jax.tree.map(lambda x: x.astype(jnp.float32) if ct.is_float(x) else x, p16),
        tvs16,
        coefs,
        spec,
    )
    chex.assert_trees_all_equal(got16, jax.tree.map(lambda r, g: r.astype(g.dtype), ref16, got16))
    g = jax.jit(
        jax.grad(
            lambda c: sum(
                jnp.sum(x.astype(jnp.float32))
                for x in jax.tree.leaves(atlas.compose(p16, tvs16, c, spec))
                if ct.is_float(x)
            )
        )
    )(coefs)
    chex.assert_trees_all_equal_dtypes(g, coefs)


def test_half_precision_task_vectors_hold_no_float32_copy():
    """The training step's compiled temporaries stay far below a float32 copy of τ.

    Regression: XLA shared the forward pass's float32 conversion of a bfloat16 τ with the
    coefficient gradient and kept it alive across the backward pass (the backward's barrier
    prevents it). A model whose activations are tiny next to τ makes the copy visible.
    """
    t, width = 8, 256
    params = {"w1": jnp.ones((width, width)), "w2": jnp.ones((width, width))}
    tvs = jax.tree.map(lambda x: jnp.full((t, *x.shape), 1e-3, jnp.bfloat16), params)
    spec = atlas.blocks(params)
    x = jnp.ones((2, width))

    def loss(c, theta0, tvs, x):  # arguments, not constants: nothing is folded at compile time
        p = atlas.compose(theta0, tvs, c, spec, implementation="xla")
        return jnp.sum(jnp.tanh(x @ p["w1"]) @ p["w2"])

    compiled = (
        jax.jit(jax.grad(loss)).lower(atlas.init(params, tvs, spec), params, tvs, x).compile()
    )
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001  (not every backend reports it)
        pytest.skip("no memory analysis on this backend")
    f32_copy = 2 * t * width * width * 4
    assert temp < f32_copy / 4, (temp, f32_copy)


# ----------------------------------------------------------------------------- bad input


def test_mismatched_coefficients_raise(rng):
    params = _params(rng)
    tvs = _task_vectors(rng, params, 2)
    coefs = atlas.init(params, tvs)
    missing = {**coefs, "layer_0": {k: v for k, v in coefs["layer_0"].items() if k != "ln"}}
    with pytest.raises(ValueError, match="no entry for block 'layer_0/ln/scale'"):
        atlas.compose(params, tvs, missing)
    bad_shape = jax.tree.map(lambda c: c, coefs)
    bad_shape["embed"]["pos"] = jnp.zeros(3)
    with pytest.raises(
        ValueError, match=r"coefficients\['embed/pos'\] has shape \(3,\), expected \(2,\)"
    ):
        atlas.compose(params, tvs, bad_shape)
    extra = {**coefs, "nope": jnp.zeros(2)}
    with pytest.raises(ValueError, match="'nope' that is no block"):
        atlas.compose(params, tvs, extra)
    spec = atlas.blocks(params, partitions=2)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        atlas.compose(params, tvs, coefs, spec)
    with pytest.raises(ValueError, match="shape mismatch at path 'embed/pos'"):
        bad_tv = jax.tree.map(lambda x: x, tvs)
        bad_tv["embed"]["pos"] = jnp.zeros((2, 4, 3))
        atlas.compose(params, bad_tv, coefs)
    with pytest.raises(ValueError, match="built for another parameter tree"):
        atlas.compose({"a": jnp.zeros(2)}, {"a": jnp.zeros((1, 2))}, {"a": jnp.zeros(1)}, spec)


def test_exclude_matching_nothing_warns(rng):
    params = _params(rng)
    with pytest.warns(UserWarning, match=r"exclude\[1\]='nothing_here'"):
        atlas.blocks(params, exclude=["ln", "nothing_here"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atlas.blocks(params, exclude=["ln"], groups=[QKV])


def test_groups_rule_matching_nothing_raises(rng):
    # A rule written for another layout (here linen's query/key/value on Hugging Face
    # q_proj/k_proj/v_proj paths) must not silently leave the blocks per leaf.
    params = {"enc": {"self_attn": {"q_proj": {"kernel": jnp.zeros((4, 4))}}}}
    with pytest.raises(
        ValueError,
        match=r"groups\[1\]='\^\(\.\*\)/\(query\|key\|value\)/bias\$'.*"
        r"'enc/self_attn/q_proj/kernel'.*CLIP_QKV_GROUPS",
    ):
        atlas.blocks(params, groups=[(r"q_proj", "q"), atlas.VIT_QKV_GROUPS[1]])
    with pytest.raises(ValueError, match=r"match no floating-point leaf: groups\[0\]=.count."):
        atlas.blocks(_params(rng), groups=[("count", "c")])  # an int leaf only


def test_leaf_claimed_by_two_groups_raises(rng):
    params = _params(rng)
    with pytest.raises(ValueError, match="'layer_0/key/kernel' is claimed by two groups"):
        atlas.blocks(params, groups=[QKV, (r"key", "keys")])


def test_bad_hyperparameters_raise(rng):
    params = _params(rng)
    for k in (0, -1):
        with pytest.raises(ValueError, match=f"partitions={k} must be >= 1"):
            atlas.blocks(params, partitions=k)
    with pytest.raises(ValueError, match="partitions=True must be an int"):
        atlas.blocks(params, partitions=True)
    with pytest.raises(ValueError, match="partition_scope='rows'"):
        atlas.blocks(params, partition_scope="rows")
    with pytest.raises(ValueError, match="invalid regex"):
        atlas.blocks(params, exclude=["("])
    with pytest.raises(ValueError, match="nests under block 'layer_0/ln/scale'"):
        atlas.blocks(params, groups=[(r"query/kernel", "layer_0/ln/scale/q")])
    with pytest.raises(ValueError, match="no leaf is composed"):
        atlas.blocks(params, exclude=[".*"])
    with pytest.raises(ValueError, match="epochs=0 must be >= 1"):
        atlas.fit(
            lambda p, b, r: 0.0,
            params,
            _task_vectors(rng, params, 1),
            lambda s: None,
            epochs=0,
            steps_per_epoch=1,
        )
    with pytest.raises(ValueError, match="total_steps=0"):
        atlas.few_shot_optimizer(0)


def test_partitions_are_bounded_by_the_largest_block(rng):
    """K beyond the entries of the largest partitioned block only adds empty groups."""
    params = _params(rng)  # largest partitioned leaf: 15 entries ('embed/pos', (5, 3))
    assert atlas.blocks(params, partitions=15).partitions == 15
    with pytest.raises(ValueError, match="partitions=16 exceeds the 15 entries"):
        atlas.blocks(params, partitions=16)
    with pytest.raises(ValueError, match="partitions=1000000000 exceeds"):
        atlas.blocks(params, partitions=10**9)  # rejected before allocating anything
    assert atlas.blocks(params, partitions=np.int64(2)).partitions == 2


def test_nonfinite_coefficients_are_rejected_eagerly(rng):
    params = _params(rng)
    tvs = _task_vectors(rng, params, 2)
    coefs = atlas.init(params, tvs)
    coefs["layer_0"]["key"]["bias"] = coefs["layer_0"]["key"]["bias"].at[1].set(jnp.inf)
    with pytest.raises(ValueError, match=r"coefficients\['layer_0/key/bias'\] holds NaN or Inf"):
        atlas.compose(params, tvs, coefs)
    # traced (inside a step) it cannot be checked: the step's non-finite policy is in charge
    out = jax.jit(lambda c: atlas.compose(params, tvs, c))(coefs)
    assert not np.isfinite(np.asarray(out["layer_0"]["key"]["bias"])).all()
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        atlas.fit(
            lambda p, b, r: 0.0,
            params,
            tvs,
            lambda s: None,
            epochs=1,
            steps_per_epoch=1,
            coefficients=coefs,
        )


# ----------------------------------------------------------------------------- fit


def _regression_problem(rng):
    """y = x @ W*, with W* = θ0 + per-block combinations of two task vectors."""
    params = {
        "a": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)},
    }
    tvs = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(2, *x.shape)), jnp.float32), params)
    true = {"a": {"kernel": jnp.array([0.6, -0.4])}, "b": {"kernel": jnp.array([-0.3, 0.8])}}
    target = atlas.compose(params, tvs, true)
    x = rng.normal(size=(256, 6)).astype(np.float32)
    apply = lambda p, x: jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
    y = np.asarray(apply(target, x))
    return params, tvs, true, apply, x, y


def test_fit_recovers_anisotropic_coefficients(rng):
    params, tvs, true, apply, x, y = _regression_problem(rng)
    loss_fn = lambda p, batch, r: jnp.mean((apply(p, batch["x"]) - batch["y"]) ** 2)
    batch_at = lambda s: {
        "x": x[(s % 8) * 32 : (s % 8 + 1) * 32],
        "y": y[(s % 8) * 32 : (s % 8 + 1) * 32],
    }
    evaluate = lambda p: {"neg_mse": -jnp.mean((apply(p, x) - y) ** 2)}
    res = atlas.fit(
        loss_fn,
        params,
        tvs,
        batch_at,
        epochs=30,
        steps_per_epoch=8,
        optimizer=optax.adam(0.05),
        evaluate=evaluate,
        score="neg_mse",
    )
    chex.assert_trees_all_close(res.coefficients, true, atol=0.05)
    assert res.history[0]["epoch"] == 0 and res.best_epoch > 0
    assert res.best_score == max(h["score"] for h in res.history)
    chex.assert_trees_all_equal_shapes(res.final_coefficients, true)


@pytest.mark.parametrize("partitions", [None, 3])
def test_split_step_matches_one_program(rng, partitions):
    # fit(split_step=True) runs compose, the model and the coefficient update as three
    # programs; the coefficients, losses and aux metrics must be those of the one program.
    params, tvs, _, apply, x, y = _regression_problem(rng)
    spec = atlas.blocks(params, partitions=partitions)

    def loss_fn(p, batch, r):  # uses the step's rng, returns aux
        err = jnp.mean((apply(p, batch["x"]) - batch["y"]) ** 2)
        return err + 1e-3 * jax.random.normal(r, ()), {"err": err}

    batch_at = lambda s: {"x": x[(s % 8) * 32 : (s % 8 + 1) * 32], "y": y[(s % 8) * 32 :][:32]}
    runs = [
        atlas.fit(
            loss_fn, params, tvs, batch_at, epochs=2, steps_per_epoch=4, spec=spec,
            optimizer=optax.adam(0.05), split_step=split,
        )
        for split in (False, True)
    ]  # fmt: skip
    chex.assert_trees_all_equal(runs[0].final_coefficients, runs[1].final_coefficients)
    losses = [[h["train_loss"] for h in r.history[1:]] for r in runs]
    assert losses[0] == losses[1] and losses[0][1] < losses[0][0]  # and it trained


def test_fit_keeps_best_epoch_and_stops(rng):
    params, tvs, _, apply, x, y = _regression_problem(rng)
    loss_fn = lambda p, batch, r: (jnp.mean(apply(p, batch["x"]) ** 2), {})
    scores = iter([0.5, 0.9, 0.1, 0.95, 0.2])
    evaluate = lambda p: {"s": next(scores), "control": 1.0}
    res = atlas.fit(
        loss_fn,
        params,
        tvs,
        lambda s: {"x": x[:8]},
        epochs=4,
        steps_per_epoch=2,
        evaluate=evaluate,
        score="s",
    )
    assert res.best_epoch == 3 and res.best_score == 0.95
    # Negation-style selection: inadmissible epochs are never kept; stop ends training.
    controls = iter([1.0, 0.99, 0.5, 0.99])
    targets = iter([0.9, 0.6, 0.1, 0.05])
    evaluate = lambda p: {"target_accuracy": next(targets), "control_accuracy": next(controls)}
    res = atlas.fit(
        loss_fn,
        params,
        tvs,
        lambda s: {"x": x[:8]},
        epochs=3,
        steps_per_epoch=1,
        evaluate=evaluate,
        score=atlas.negation_score(0.95),
        stop=lambda m: m["control_accuracy"] < 0.95,
    )
    assert res.best_epoch == 1 and res.best_score == -0.6
    assert len(res.history) == 3  # stopped after epoch 2


def test_objectives(rng):
    logits = lambda p, b: b["x"] @ p["w"]
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 5))
    ce = lambda z, y: float(optax.softmax_cross_entropy_with_integer_labels(z, y).mean())
    l, aux = jax.jit(atlas.supervised_objective(logits))(params, {"x": x, "y": y}, None)
    np.testing.assert_allclose(l, ce(x @ params["w"], y), rtol=1e-6)
    add = atlas.task_addition_objective([logits, lambda p, b: 2 * logits(p, b)])
    l, aux = jax.jit(add)(params, [{"x": x, "y": y}, {"x": x, "y": y}], None)
    np.testing.assert_allclose(l, ce(x @ params["w"], y) + ce(2 * x @ params["w"], y), rtol=1e-6)
    neg = atlas.task_negation_objective(logits, lambda p, b: 2 * logits(p, b))
    l, aux = jax.jit(neg)(params, {"target": {"x": x, "y": y}, "control": {"x": x, "y": y}}, None)
    np.testing.assert_allclose(l, -ce(x @ params["w"], y) + ce(2 * x @ params["w"], y), rtol=1e-6)
    assert float(jax.jit(atlas.entropy_objective(logits))(params, {"x": x}, None)) > 0
    pl = jax.jit(atlas.pseudo_label_objective(logits, threshold=0.0))
    l, aux = pl(params, {"weak": x, "strong": x}, None)
    assert float(aux["confident"]) == 1.0
    with pytest.raises(ValueError, match="threshold=1.0"):
        atlas.pseudo_label_objective(logits, threshold=1.0)


def test_repeated_fits_with_the_default_optimizer_do_not_recompile_or_retrace(rng, compiles):
    # The optimiser is static state of the compiled step: fits that leave `optimizer` unset
    # must share one instance, or every later fit compiles its step again. Nor does a fit
    # with the shapes of an earlier one trace the loss again (to learn whether it has aux).
    params, tvs, _, apply, x, y = _regression_problem(rng)
    traces = []

    def loss_fn(p, batch, r):
        traces.append(1)  # runs only while the loss is traced
        return jnp.mean((apply(p, batch["x"]) - batch["y"]) ** 2)

    batch_at = lambda s: {"x": x[:32], "y": y[:32]}
    first = atlas.fit(loss_fn, params, tvs, batch_at, epochs=1, steps_per_epoch=2)
    before, traced = len(compiles), len(traces)
    second = atlas.fit(loss_fn, params, tvs, batch_at, epochs=1, steps_per_epoch=2)
    assert before > 0 and len(compiles) == before
    assert traced > 0 and len(traces) == traced
    chex.assert_trees_all_equal(first.coefficients, second.coefficients)
