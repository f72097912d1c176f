"""Small solvers on the probability simplex, used by MGDA and CAGrad (T×T problems)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["min_norm_weights", "project_simplex"]


def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of ``v`` (shape ``[T]``) onto the probability simplex.

    The sort-based algorithm of Held et al. (1974) / Duchi et al. (2008).
    """
    t = v.shape[0]
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    ind = jnp.arange(1, t + 1, dtype=v.dtype)
    k = jnp.sum(u - css / ind > 0)  # >= 1 always
    theta = css[k - 1] / k.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def _affine_min_norm(g: jax.Array, support: jax.Array) -> jax.Array:
    """``argmin w^T G w`` s.t. ``sum(w) = 1`` and ``w = 0`` off ``support`` (KKT, least squares)."""
    t = g.shape[0]
    s = support.astype(g.dtype)
    a = jnp.zeros((t + 1, t + 1), g.dtype)
    a = a.at[:t, :t].set(g * s[:, None] * s[None, :] + jnp.diag(1.0 - s))
    a = a.at[:t, t].set(s)
    a = a.at[t, :t].set(s)
    rhs = jnp.zeros((t + 1,), g.dtype).at[t].set(1.0)
    sol = jnp.linalg.lstsq(a, rhs)[0]
    return sol[:t] * s


def _w0(t: int, dtype) -> jax.Array:
    """The simplex's centre, ``[1/T] * T``."""
    return jnp.full((t,), 1.0 / t, dtype)


def min_norm_weights(g: jax.Array, *, max_iters: int = 200) -> jax.Array:
    """Weights of the min-norm point of the convex hull: ``argmin_{w in simplex} w^T G w``.

    Accelerated projected gradient (FISTA with adaptive restart, O'Donoghue & Candès 2015)
    on the Gram matrix scaled to unit diagonal maximum, followed by an exact polish: the
    KKT system of the equality-constrained problem on the support the iterations found,
    accepted when it is feasible and not worse. The polished point is exact up to
    round-off whenever the support was identified, which ``max_iters`` iterations do for
    all but degenerate problems. For T = 2 the minimiser is computed in closed form,
    ``γ = clip(<g2 - g1, g2> / ||g1 - g2||², 0, 1)`` (no iterations: on a GPU the loop's
    small launches dominated a small model's step).

    Args:
      g: ``[T, T]`` positive semi-definite Gram matrix.
      max_iters: projected-gradient iterations before the polish.

    Returns:
      ``[T]`` weights on the simplex.
    """
    t = g.shape[0]
    scale = jnp.max(jnp.diag(g))
    ok = scale > 0
    gs = g / jnp.where(ok, scale, 1.0)
    if t == 2:  # closed form (Sener & Koltun, Alg. 1): no iterations, a handful of scalar ops
        a, b, c = gs[0, 0], gs[1, 1], gs[0, 1]
        den = a + b - 2.0 * c  # = ||g1 - g2||^2 / scale >= 0
        gamma = jnp.clip((b - c) / jnp.where(den > 0, den, 1.0), 0.0, 1.0)
        gamma = jnp.where(den > 0, gamma, 0.5)  # equal gradients: every point is optimal
        return jnp.where(ok, jnp.stack([gamma, 1.0 - gamma]), _w0(t, g.dtype))
    lip = 2.0 * jnp.maximum(jnp.linalg.eigvalsh(gs)[-1], 1e-12)
    obj = lambda w: w @ gs @ w
    w0 = _w0(t, g.dtype)

    def body(_, carry):
        w, y, k = carry
        w_new = project_simplex(y - (2.0 * gs @ y) / lip)
        k_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * k * k))
        restart = jnp.dot(y - w_new, w_new - w) > 0
        y_new = w_new + jnp.where(restart, 0.0, (k - 1.0) / k_new) * (w_new - w)
        return w_new, y_new, jnp.where(restart, 1.0, k_new)

    w, _, _ = jax.lax.fori_loop(0, max_iters, body, (w0, w0, jnp.ones((), g.dtype)))
    support = w > 1e-6 * jnp.max(w)
    wp = _affine_min_norm(gs, support)
    feasible = jnp.all(jnp.isfinite(wp)) & jnp.all(wp >= -1e-6)
    wp = jnp.maximum(wp, 0.0)
    wp = wp / jnp.maximum(jnp.sum(wp), 1e-30)
    better = obj(wp) <= obj(w) * (1.0 + 1e-6) + 1e-12
    w = jnp.where(feasible & better, wp, w)
    return jnp.where(ok, w, w0)
