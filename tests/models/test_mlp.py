"""Tests of cljax.models.MLP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import MLP

MODEL = MLP(hidden=(7, 5), num_classes=3)
X = np.random.default_rng(0).normal(size=(4, 2, 3, 2)).astype(np.float32)
INIT = jax.jit(MODEL.init)
APPLY = jax.jit(MODEL.apply)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def params():
    return INIT(jax.random.key(1), X)["params"]


def test_param_count_matches_gpm_mlp():
    # 784-100-100-10: (784*100 + 100) + (100*100 + 100) + (100*10 + 10).
    x = jnp.zeros((1, 28, 28, 1))
    assert _count(jax.eval_shape(MLP(num_classes=10).init, jax.random.key(0), x)) == 89_610
    no_bias = jax.eval_shape(MLP(num_classes=10, use_bias=False).init, jax.random.key(0), x)
    assert _count(no_bias) == 78_400 + 10_000 + 1_000


def test_forward_matches_numpy(params):
    h = X.reshape(4, -1)
    for name in ("hidden_0", "hidden_1"):
        h = np.maximum(h @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]), 0)
    want = h @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    got = APPLY({"params": params}, X)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_features_vs_head(params):
    encoder_params = {k: v for k, v in params.items() if k != "head"}
    feats = jax.jit(MLP(hidden=(7, 5)).apply)({"params": encoder_params}, X)
    chex.assert_shape(feats, (4, 5))
    logits = APPLY({"params": params}, X)
    chex.assert_trees_all_close(
        logits, feats @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-6
    )


def test_jit_matches_eager_and_init_is_deterministic(params):
    chex.assert_trees_all_equal(params, INIT(jax.random.key(1), X)["params"])
    variables = {"params": params}
    chex.assert_trees_all_close(
        APPLY(variables, X), MODEL.apply(variables, X), rtol=1e-6, atol=1e-6
    )


def test_bad_hidden():
    with pytest.raises(ValueError, match=r"hidden=\(0,\) must be positive"):
        jax.eval_shape(MLP(hidden=(0,)).init, jax.random.key(0), jnp.ones((1, 3)))
