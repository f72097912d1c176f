"""Tests of cljax.models.ViT."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import ViT

SMALL = dict(patch_size=7, hidden_dim=16, depth=2, num_heads=4, mlp_dim=32)


def _init(model, key, x):
    return jax.jit(model.init)(key, x)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_param_count_by_hand():
    p, d, depth, mlp, classes, c = 7, 64, 4, 128, 10, 1
    model = ViT(patch_size=p, hidden_dim=d, depth=depth, num_heads=4, mlp_dim=mlp, num_classes=10)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, c)))["params"]
    tokens = (28 // p) ** 2 + 1
    embed = p * p * c * d + d
    block = 2 * (2 * d) + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)  # 2 LN, q/k/v/out, MLP
    want = embed + d + tokens * d + depth * block + 2 * d + (d * classes + classes)
    assert _count(params) == want
    assert {"embedding", "cls", "pos_embedding", "ln_final", "head"} <= set(params)
    assert {f"block_{i}" for i in range(depth)} <= set(params)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_shapes_jit_determinism(pool, rng):
    x = rng.uniform(size=(5, 28, 28, 3)).astype(np.float32)
    model = ViT(**SMALL, pool=pool)
    params = _init(model, jax.random.key(0), x)
    chex.assert_trees_all_equal(params, _init(model, jax.random.key(0), x))
    feats = jax.jit(model.apply)(params, x)
    chex.assert_shape(feats, (5, 16))
    chex.assert_tree_all_finite(feats)
    # Batch elements are independent: the first row alone gives the same features.
    chex.assert_trees_all_close(
        jax.jit(model.apply)(params, x[:1]), feats[:1], rtol=1e-5, atol=1e-5
    )


def test_features_vs_head(rng):
    x = rng.uniform(size=(4, 28, 28, 1)).astype(np.float32)
    params = _init(ViT(**SMALL, num_classes=7), jax.random.key(1), x)["params"]
    enc = {k: v for k, v in params.items() if k != "head"}
    feats = jax.jit(ViT(**SMALL).apply)({"params": enc}, x)
    logits = jax.jit(ViT(**SMALL, num_classes=7).apply)({"params": params}, x)
    chex.assert_shape(logits, (4, 7))
    chex.assert_trees_all_close(
        logits, feats @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-5
    )


def _permute_patches(x, perm, p):
    n, h, w, c = x.shape
    g = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    g = g.reshape(n, -1, p, p, c)[:, perm]
    g = g.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return g.reshape(n, h, w, c)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_permutation_equivariance_without_position_embedding(pool, rng):
    # Self-attention treats tokens as a set: only the position embedding tells patches apart.
    x = rng.uniform(size=(2, 28, 28, 1)).astype(np.float32)
    model = ViT(**SMALL, pool=pool)
    params = _init(model, jax.random.key(0), x)["params"]
    perm = rng.permutation(16)
    xp = _permute_patches(x, perm, 7)
    flat = jax.tree.map(lambda a: a, params)
    flat["pos_embedding"] = jnp.zeros_like(params["pos_embedding"])
    apply = jax.jit(model.apply)
    chex.assert_trees_all_close(
        apply({"params": flat}, xp), apply({"params": flat}, x), rtol=1e-4, atol=1e-5
    )
    # With the learned position embedding the output does depend on the patch order.
    assert not np.allclose(apply({"params": params}, xp), apply({"params": params}, x))


def test_bad_config():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_dim=16"):
        _init(ViT(**{**SMALL, "num_heads": 3}), jax.random.key(0), x)
    with pytest.raises(ValueError, match="patch_size=5 must divide"):
        _init(ViT(**{**SMALL, "patch_size": 5}), jax.random.key(0), x)
    with pytest.raises(ValueError, match="pool='max'"):
        _init(ViT(**SMALL, pool="max"), jax.random.key(0), x)
