"""Tests of cljax.models.LeNet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models import LeNet


def _init(model, key, x):
    return jax.jit(model.init)(key, x)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_param_count_matches_caffe_lenet():
    params = jax.eval_shape(
        LeNet(num_classes=10).init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))
    )["params"]
    conv0 = 5 * 5 * 1 * 20 + 20
    conv1 = 5 * 5 * 20 * 50 + 50
    dense = 4 * 4 * 50 * 500 + 500  # 28 -> 24 -> 12 -> 8 -> 4
    head = 500 * 10 + 10
    assert _count(params) == conv0 + conv1 + dense + head == 431_080
    assert set(params) == {"conv_0", "conv_1", "dense_0", "head"}


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


def test_forward_matches_numpy(rng):
    model = LeNet(num_classes=3, features=(4, 6, 8))
    x = rng.uniform(size=(2, 16, 16, 1)).astype(np.float32)  # 16 -> 12 -> 6 -> 2 -> 1
    params = _init(model, jax.random.key(0), x)["params"]
    got = jax.jit(model.apply)({"params": params}, x)
    chex.assert_trees_all_close(
        got, _np_forward(params, x).astype(np.float32), rtol=1e-4, atol=1e-5
    )


def test_features_vs_head_and_determinism(rng):
    x = rng.uniform(size=(3, 28, 28, 1)).astype(np.float32)
    params = _init(LeNet(num_classes=10), jax.random.key(0), x)["params"]
    enc = {k: v for k, v in params.items() if k != "head"}
    feats = jax.jit(LeNet().apply)({"params": enc}, x)
    chex.assert_shape(feats, (3, 500))
    logits = jax.jit(LeNet(num_classes=10).apply)({"params": params}, x)
    chex.assert_trees_all_close(
        logits, feats @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-5, atol=1e-5
    )
    again = _init(LeNet(num_classes=10), jax.random.key(0), x)["params"]
    chex.assert_trees_all_equal(params, again)


def test_rejects_flat_input():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        _init(LeNet(), jax.random.key(0), jnp.ones((2, 784)))
