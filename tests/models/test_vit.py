"""Tests of cljax.models.ViT."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import ViT

SMALL = dict(patch_size=7, hidden_dim=16, depth=2, num_heads=4, mlp_dim=32)
X = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)


@functools.cache
def _jit(method: str, num_classes=None, pool="cls"):
    """One jitted ``init``/``apply`` per configuration, shared by the tests (compiles are slow)."""
    return jax.jit(getattr(ViT(**SMALL, num_classes=num_classes, pool=pool), method))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def params():
    """One initialisation shared by the tests (``pool`` adds no parameters)."""
    return _jit("init", 7)(jax.random.key(0), X)["params"]


def _encoder(params):
    return {k: v for k, v in params.items() if k != "head"}


def test_param_count_by_hand():
    p, d, depth, mlp, classes, c = 7, 64, 4, 128, 10, 1
    model = ViT(patch_size=p, hidden_dim=d, depth=depth, num_heads=4, mlp_dim=mlp, num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, c)))["params"]
    tokens = (28 // p) ** 2 + 1
    embed = p * p * c * d + d
    block = 2 * (2 * d) + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)  # 2 LN, q/k/v/out, MLP
    want = embed + d + tokens * d + depth * block + 2 * d + (d * classes + classes)
    assert _count(shapes) == want
    assert {"embedding", "cls", "pos_embedding", "ln_final", "head"} <= set(shapes)
    assert {f"block_{i}" for i in range(depth)} <= set(shapes)


@pytest.mark.slow
def test_init_deterministic(params):
    again = _jit("init", 7)(jax.random.key(0), X)["params"]
    chex.assert_trees_all_equal(params, again)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_features_vs_head(params, pool):
    apply_enc = _jit("apply", pool=pool)
    feats = apply_enc({"params": _encoder(params)}, X)
    chex.assert_shape(feats, (3, 16))
    chex.assert_tree_all_finite(feats)
    logits = _jit("apply", 7, pool)({"params": params}, X)
    chex.assert_shape(logits, (3, 7))
    chex.assert_trees_all_close(
        logits, feats @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-5
    )
    # Examples are independent: the first one alone gives the same features.
    chex.assert_trees_all_close(
        apply_enc({"params": _encoder(params)}, X[:1]), feats[:1], rtol=1e-5, atol=1e-5
    )


def _permute_patches(x, perm, p):
    n, h, w, c = x.shape
    g = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    g = g.reshape(n, -1, p, p, c)[:, perm]
    g = g.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return g.reshape(n, h, w, c)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_patch_order_matters_only_through_position_embedding(params, pool):
    # Self-attention treats tokens as a set: only the position embedding tells patches apart.
    apply = _jit("apply", pool=pool)
    enc = _encoder(params)
    xp = _permute_patches(X, np.random.default_rng(1).permutation(16), 7)
    no_pos = {**enc, "pos_embedding": jnp.zeros_like(enc["pos_embedding"])}
    chex.assert_trees_all_close(
        apply({"params": no_pos}, xp), apply({"params": no_pos}, X), rtol=1e-4, atol=1e-5
    )
    assert not np.allclose(apply({"params": enc}, xp), apply({"params": enc}, X), atol=1e-4)


def test_bad_config():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_dim=16"):
        jax.eval_shape(ViT(**{**SMALL, "num_heads": 3}).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="patch_size=5 must divide"):
        jax.eval_shape(ViT(**{**SMALL, "patch_size": 5}).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="pool='max'"):
        jax.eval_shape(ViT(**SMALL, pool="max").init, jax.random.key(0), x)
