"""ZSCL distillation against numpy references; the reference embeddings are computed once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.losses import kd_loss, reference_embeddings, zscl_distillation
from cljax.train import TrainState, make_step


def _np_kd(t, s, T):
    """mean_rows CE(softmax(t/T), s/T) * T^2, in float64 with explicit max-shifts."""
    t = np.asarray(t, np.float64) / T
    s = np.asarray(s, np.float64) / T
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logq = s - s.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    return float(np.mean(-(p * logq).sum(-1)) * T**2)


def _np_zscl(s, t, g, T, scale, wi, wt):
    n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    ls = scale * n(np.float64(s)) @ np.float64(g).T
    lt = scale * n(np.float64(t)) @ np.float64(g).T
    return wi * _np_kd(lt, ls, T) + wt * _np_kd(lt.T, ls.T, T)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_matches_numpy(rng, T):
    t, s = rng.normal(size=(2, 6, 9)) * 3
    got = jax.jit(kd_loss, static_argnames="temperature")(s, t, temperature=T)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_kd(t, s, T), rtol=1e-5)


def test_kd_minimum_is_the_teacher(rng):
    t = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    g_t = jax.jit(jax.grad(lambda s: kd_loss(s, t)))(t)
    np.testing.assert_allclose(g_t, 0.0, atol=1e-6)
    s = t + jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
    assert float(kd_loss(s, t)) > float(kd_loss(t, t))
    # no gradient flows into the teacher
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda t_: kd_loss(s, t_)))(t), 0.0)


def test_zscl_distillation_matches_numpy_both_terms(rng):
    wi, wt = 0.5, 0.25  # distinct weights: a swapped or dropped term would show
    B, K, D = 5, 11, 8
    s, t = rng.normal(size=(2, B, D))
    g = rng.normal(size=(K, D))
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    fn = jax.jit(lambda s, t, g: zscl_distillation(s, t, g, image_weight=wi, transposed_weight=wt))
    loss, aux = fn(s, t, g)
    np.testing.assert_allclose(loss, _np_zscl(s, t, g, 2.0, 100.0, wi, wt), rtol=1e-4)
    # the two terms separately: softmax over the K reference axis, then over the B batch axis
    np.testing.assert_allclose(aux["kd_image"], _np_zscl(s, t, g, 2.0, 100.0, 1, 0), rtol=1e-4)
    np.testing.assert_allclose(aux["kd_transposed"], _np_zscl(s, t, g, 2.0, 100.0, 0, 1), rtol=1e-4)
    assert not np.isclose(float(aux["kd_image"]), float(aux["kd_transposed"]))


@pytest.mark.slow
def test_zscl_gradient_reaches_only_the_student(rng):
    s, t = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
    f = lambda s, t, g: zscl_distillation(s, t, g)[0]
    gs, gt, gg = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(s, t, g)
    assert float(jnp.abs(gs).max()) > 0
    np.testing.assert_array_equal(gt, 0.0)
    np.testing.assert_array_equal(gg, 0.0)
    # student == teacher (up to scale: features are normalised) is the minimum
    np.testing.assert_allclose(jax.jit(jax.grad(f))(3.0 * t, t, g), 0.0, atol=1e-5)


def test_reference_embeddings_normalised_and_batch_size_free(rng):
    w = rng.normal(size=(5, 3)).astype(np.float32)
    x = rng.normal(size=(13, 5)).astype(np.float32)
    a = reference_embeddings(lambda b: b @ w, x, batch_size=4)
    b = reference_embeddings(lambda b: b @ w, x, batch_size=100)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-6)
    want = x @ w
    np.testing.assert_allclose(a, want / np.linalg.norm(want, axis=-1, keepdims=True), rtol=1e-5)


@pytest.mark.slow
def test_teacher_reference_embeddings_are_computed_once(rng):
    calls = []
    teacher = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

    def teacher_embed(x):
        calls.append(len(x))
        return x @ teacher

    x_anchor = rng.normal(size=(10, 5)).astype(np.float32)
    ref = reference_embeddings(teacher_embed, x_anchor, batch_size=4)
    assert calls == [4, 4, 2]

    def loss_fn(params, batch, rng_):
        student = batch["x_ref"] @ params["w"]
        return zscl_distillation(student, batch["x_ref"] @ teacher, ref)[0]

    state = TrainState.create({"w": teacher + 0.1}, optax.sgd(1e-2))
    step = make_step(loss_fn)
    for _ in range(4):
        state, m = step(state, {"x_ref": rng.normal(size=(6, 5)).astype(np.float32)})
        assert np.isfinite(float(m["loss"]))
    assert calls == [4, 4, 2]  # nothing recomputed by the train step


def test_empty_reference_set(rng):
    with pytest.raises(ValueError, match="reference set is empty"):
        reference_embeddings(lambda x: x, np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="reference set is empty"):
        zscl_distillation(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.zeros((0, 4)))


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature=0"):
        kd_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0)
    with pytest.raises(ValueError, match="must be the same"):
        zscl_distillation(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="feature width 4"):
        zscl_distillation(jnp.ones((2, 4)), jnp.ones((2, 4)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="batch_size=0"):
        reference_embeddings(lambda x: x, np.ones((3, 4)), batch_size=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_hyperparameters_rejected_by_name(bad):
    s = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"kd_loss: temperature=.* must be finite"):
        kd_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=bad)
    for name in ("temperature", "logit_scale", "image_weight", "transposed_weight"):
        with pytest.raises(ValueError, match=rf"zscl_distillation: {name}=.* must be finite"):
            zscl_distillation(s, s, jnp.ones((3, 4)), **{name: bad})
