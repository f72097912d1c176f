"""Tests of cljax.models.MLP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import MLP


def _init(model, key, x):
    return jax.jit(model.init)(key, x)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_param_count_matches_gpm_mlp():
    # 784-100-100-10: (784*100 + 100) + (100*100 + 100) + (100*10 + 10).
    params = jax.eval_shape(MLP(num_classes=10).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert _count(params) == 78_500 + 10_100 + 1_010
    no_bias = jax.eval_shape(
        MLP(num_classes=10, use_bias=False).init, jax.random.key(0), jnp.zeros((1, 784))
    )
    assert _count(no_bias) == 78_400 + 10_000 + 1_000


def test_forward_matches_numpy(rng):
    model = MLP(hidden=(7, 5), num_classes=3)
    x = rng.normal(size=(4, 2, 3, 2)).astype(np.float32)
    params = _init(model, jax.random.key(1), x)["params"]
    h = x.reshape(4, -1)
    for name in ("hidden_0", "hidden_1"):
        h = np.maximum(h @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]), 0)
    want = h @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    got = jax.jit(model.apply)({"params": params}, x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_features_vs_head(rng):
    x = rng.normal(size=(6, 20)).astype(np.float32)
    full = MLP(hidden=(8, 8), num_classes=4)
    params = _init(full, jax.random.key(2), x)["params"]
    encoder_params = {k: v for k, v in params.items() if k != "head"}
    feats = MLP(hidden=(8, 8)).apply({"params": encoder_params}, x)
    chex.assert_shape(feats, (6, 8))
    logits = full.apply({"params": params}, x)
    chex.assert_trees_all_close(
        logits, feats @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-6
    )


def test_jit_deterministic():
    model = MLP(num_classes=10)
    x = jnp.ones((3, 28, 28, 1))
    p1 = _init(model, jax.random.key(0), x)
    p2 = _init(model, jax.random.key(0), x)
    chex.assert_trees_all_equal(p1, p2)
    apply = jax.jit(model.apply)
    chex.assert_trees_all_close(apply(p1, x), model.apply(p1, x), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(apply(p1, x), apply(p2, x))


def test_bad_hidden():
    with pytest.raises(ValueError, match="hidden"):
        MLP(hidden=(0,)).init(jax.random.key(0), jnp.ones((1, 3)))
