"""Tests of cljax.models.LeNet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import LeNet

FEATURES = (4, 6, 8)  # narrow, so the numpy reference stays fast
MODEL = LeNet(num_classes=3, features=FEATURES)
X = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
INIT = jax.jit(MODEL.init)
APPLY = jax.jit(MODEL.apply)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def params():
    return INIT(jax.random.key(0), X)["params"]


def test_param_count_matches_caffe_lenet():
    shapes = jax.eval_shape(
        LeNet(num_classes=10).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))
    )["params"]
    conv0 = 5 * 5 * 1 * 20 + 20
    conv1 = 5 * 5 * 20 * 50 + 50
    dense = 4 * 4 * 50 * 500 + 500  # 28 -> 24 -> 12 -> 8 -> 4
    head = 500 * 10 + 10
    assert _count(shapes) == conv0 + conv1 + dense + head == 431_080
    assert set(shapes) == {"conv_0", "conv_1", "dense_0", "head"}


def _np_forward(params, x):
    """LeNet by explicit loops over kernel offsets (VALID conv, 2x2 max pool)."""

    def conv(x, k, b):
        kh, kw = k.shape[:2]
        h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
        out = np.zeros((x.shape[0], h, w, k.shape[-1]), np.float64)
        for i in range(kh):
            for j in range(kw):
                out += np.einsum("nhwc,cd->nhwd", x[:, i : i + h, j : j + w], k[i, j])
        return out + b

    def pool(x):
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = pool(np.maximum(conv(x, p["conv_0"]["kernel"], p["conv_0"]["bias"]), 0))
    x = pool(np.maximum(conv(x, p["conv_1"]["kernel"], p["conv_1"]["bias"]), 0))
    x = np.maximum(x.reshape(len(x), -1) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0)
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def test_forward_matches_numpy(params):
    got = APPLY({"params": params}, X)
    want = _np_forward(params, X).astype(np.float32)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_features_vs_head_and_determinism(params):
    enc = {k: v for k, v in params.items() if k != "head"}
    feats = jax.jit(LeNet(features=FEATURES).apply)({"params": enc}, X)
    chex.assert_shape(feats, (2, FEATURES[-1]))
    logits = APPLY({"params": params}, X)
    chex.assert_trees_all_close(
        logits, feats @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_equal(params, INIT(jax.random.key(0), X)["params"])


def test_rejects_flat_input():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        jax.eval_shape(LeNet().init, jax.random.key(0), jnp.ones((2, 784)))
