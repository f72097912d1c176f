"""Tests of cljax.losses entropy and pseudo-label objectives against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.losses import entropy, entropy_loss, pseudo_label_loss


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_entropy(z):
    p = _softmax(z)
    return -(p * np.log(p)).sum(-1)


@pytest.mark.slow
def test_entropy_matches_numpy_and_limits(rng):
    z = rng.normal(size=(6, 5)).astype(np.float32) * 3
    np.testing.assert_allclose(entropy(z), _np_entropy(z), rtol=1e-5)
    np.testing.assert_allclose(entropy(np.zeros(7)), np.log(7), rtol=1e-6)
    assert float(entropy(jnp.array([1e4, 0.0, 0.0]))) == pytest.approx(0.0, abs=1e-6)
    # Along another axis, and stable for huge logits.
    np.testing.assert_allclose(entropy(z.T, axis=0), _np_entropy(z), rtol=1e-5)
    assert np.isfinite(float(entropy(jnp.array([1e30, -1e30]))))
    # bfloat16 input: computed in float32.
    assert entropy(jnp.asarray(z, jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.slow
def test_entropy_loss_mean_and_mask(rng):
    z = rng.normal(size=(8, 4)).astype(np.float32)
    np.testing.assert_allclose(entropy_loss(z), _np_entropy(z).mean(), rtol=1e-5)
    w = np.array([1, 0, 1, 0, 0, 0, 0, 1], np.float32)
    np.testing.assert_allclose(entropy_loss(z, where=w), _np_entropy(z)[w > 0].mean(), rtol=1e-5)
    assert float(entropy_loss(z, where=np.zeros(8))) == 0.0
    # Its gradient sharpens the prediction: one step lowers the entropy.
    g = jax.grad(entropy_loss)(jnp.asarray(z))
    assert float(entropy_loss(z - 0.1 * g)) < float(entropy_loss(z))


def _np_pseudo(weak, strong, threshold, hard, normalize):
    p = _softmax(weak)
    conf = p.max(-1)
    mask = conf > threshold
    tgt = np.eye(p.shape[-1])[p.argmax(-1)] if hard else p
    logq = np.log(_softmax(strong))
    ce = -(tgt * logq).sum(-1)
    denom = max(mask.sum(), 1) if normalize == "confident" else len(ce)
    return (ce * mask).sum() / denom


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("normalize", ["confident", "batch"])
def test_pseudo_label_loss_matches_numpy(rng, hard, normalize):
    weak = rng.normal(size=(16, 5)).astype(np.float32) * 4
    strong = rng.normal(size=(16, 5)).astype(np.float32)
    got = pseudo_label_loss(weak, strong, threshold=0.8, hard=hard, normalize=normalize)
    want = _np_pseudo(weak, strong, 0.8, hard, normalize)
    assert 0 < (_softmax(weak).max(-1) > 0.8).sum() < 16  # the threshold selects some
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_pseudo_label_gradient_only_through_strong_view(rng):
    weak = jnp.asarray(rng.normal(size=(4, 3)) * 5, jnp.float32)
    strong = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    gw, gs = jax.grad(pseudo_label_loss, argnums=(0, 1))(weak, strong, threshold=0.5)
    np.testing.assert_array_equal(gw, 0.0)
    assert float(jnp.abs(gs).sum()) > 0
    # No confident example: zero loss, zero gradient.
    flat = jnp.zeros((4, 3))
    assert float(pseudo_label_loss(flat, strong, threshold=0.5)) == 0.0


def test_pseudo_label_bad_input():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="threshold=1.0 must be in"):
        pseudo_label_loss(z, z, threshold=1.0)
    with pytest.raises(ValueError, match="threshold=nan must be finite"):
        pseudo_label_loss(z, z, threshold=float("nan"))
    with pytest.raises(ValueError, match="normalize='mean'"):
        pseudo_label_loss(z, z, normalize="mean")
    with pytest.raises(ValueError, match=r"\(2, 3\) and strong_logits \(2, 4\)"):
        pseudo_label_loss(z, jnp.zeros((2, 4)))
