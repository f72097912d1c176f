import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.mtl import sam_gradient, sam_perturbation


def _quadratic(rng):
    a = rng.normal(size=(4, 4))
    h = jnp.asarray(a @ a.T + np.eye(4), jnp.float32)
    c = jnp.asarray(rng.normal(size=4), jnp.float32)
    loss = lambda p, batch: 0.5 * p["w"] @ h @ p["w"] - c @ p["w"] + batch
    return loss, h, c


def test_agrees_with_optax_contrib_sam(rng):
    loss, _, _ = _quadratic(rng)
    params = {"w": jnp.asarray(rng.normal(size=4), jnp.float32)}
    lr, rho = 0.1, 0.3
    opt = optax.contrib.sam(
        optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True
    )
    grad_fn = jax.grad(lambda p, _: loss(p, 0.0))
    updates, _ = opt.update(grad_fn(params, 0), opt.init(params), params, grad_fn=grad_fn)
    g_sam, info = jax.jit(lambda p: sam_gradient(loss, p, 0.0, rho=rho))(params)
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda g: -lr * g, g_sam), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(info["loss"], loss(params, 0.0), rtol=1e-6)


def test_quadratic_closed_form_and_asam(rng):
    loss, h, c = _quadratic(rng)
    w = rng.normal(size=4)
    params = {"w": jnp.asarray(w, jnp.float32)}
    g = np.asarray(h, np.float64) @ w - np.asarray(c)
    for adaptive in (False, True):
        if adaptive:
            e = 0.2 * w**2 * g / np.linalg.norm(np.abs(w) * g)
        else:
            e = 0.2 * g / np.linalg.norm(g)
        ref = np.asarray(h, np.float64) @ (w + e) - np.asarray(c)
        out, _ = sam_gradient(loss, params, 0.0, rho=0.2, adaptive=adaptive)
        np.testing.assert_allclose(out["w"], ref, rtol=1e-5, atol=1e-5)


def test_rho_zero_is_the_gradient(rng):
    loss, _, _ = _quadratic(rng)
    params = {"w": jnp.asarray(rng.normal(size=4), jnp.float32)}
    out, _ = sam_gradient(loss, params, 0.0, rho=0.0)
    chex.assert_trees_all_close(out, jax.grad(loss)(params, 0.0), rtol=1e-6)


def test_has_aux_returns_the_clean_aux(rng):
    loss, _, _ = _quadratic(rng)
    f = lambda p, b: (loss(p, b), {"w0": p["w"][0]})
    params = {"w": jnp.asarray(rng.normal(size=4), jnp.float32)}
    _, info = sam_gradient(f, params, 0.0, rho=0.5, has_aux=True)
    np.testing.assert_allclose(info["aux"]["w0"], params["w"][0])


def test_negative_rho():
    with pytest.raises(ValueError, match="rho=-0.1 must be >= 0"):
        sam_gradient(lambda p, b: p["w"].sum(), {"w": jnp.ones(2)}, None, rho=-0.1)
    with pytest.raises(ValueError, match="rho=-1 must be >= 0"):
        sam_perturbation({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, rho=-1)


def test_sam_validates_rho_and_the_trees():
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    grads = {"w": jnp.ones(3), "b": jnp.ones(2)}
    for rho, msg in [(float("inf"), "must be finite"), (True, "must be a real number")]:
        with pytest.raises(ValueError, match=rf"sam_perturbation: rho=.* {msg}"):
            sam_perturbation(grads, params, rho=rho)
        with pytest.raises(ValueError, match=rf"sam_gradient: rho=.* {msg}"):
            sam_gradient(lambda p, b: jnp.sum(p["w"]), params, None, rho=rho)
    with pytest.raises(ValueError, match=r"grads has no leaf at path 'b'"):
        sam_perturbation({"w": jnp.ones(3)}, params, rho=0.1)
    with pytest.raises(ValueError, match=r"shape mismatch at path 'w': params has \(3,\), grads"):
        sam_perturbation({"w": jnp.ones(1), "b": jnp.ones(2)}, params, rho=0.1)
    sam_perturbation(grads, params, rho=np.float32(0.05))  # a numpy scalar is fine
