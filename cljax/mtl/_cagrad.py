"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax._checks import check_int, check_scalar
from cljax.mtl._gram import combine, gram, stacked_grads
from cljax.mtl._simplex import project_simplex

__all__ = ["cagrad", "cagrad_weights"]


def cagrad_weights(
    g: jax.Array, *, c: float = 0.4, rescale: bool = True, max_iters: int = 300
) -> jax.Array:
    """CAGrad's weights on the raw task gradients, from the Gram matrix (see :func:`cagrad`).

    Minimises ``F(w) = <g_w, g_0> + c ||g_0|| ||g_w||`` over the simplex (``g_0`` the mean
    gradient, ``g_w = sum_i w_i g_i``) by projected gradient steps on a global quadratic
    majoriser: by concavity of the square root, ``sqrt(q(w')) <= sqrt(q(w)) + (q(w') -
    q(w)) / (2 sqrt(q(w)))`` and ``q`` is quadratic with curvature ``2G``, so the step
    ``1 / (c ||g_0|| lambda_max(G) / ||g_w||)`` decreases ``F`` monotonically. For T = 2 the
    one-dimensional dual is solved directly (the roots of its squared stationarity
    condition, no iterations).
    """
    t = g.shape[0]
    scale = jnp.max(jnp.diag(g))
    ok = scale > 0
    gs = g / jnp.where(ok, scale, 1.0)
    b = jnp.full((t,), 1.0 / t, g.dtype)
    gb = gs @ b
    r = c * jnp.sqrt(jnp.maximum(b @ gb, 0.0))
    if c <= 0:
        w = b
    elif t == 2:
        w = _two_task_dual(gs, gb, r)
    else:
        w = _majorised_descent(gs, gb, r, b, max_iters)
    nw = jnp.sqrt(jnp.maximum(w @ gs @ w, 0.0))
    lam = r / (nw + 1e-8)
    weights = b + lam * w
    if rescale:
        weights = weights / (1.0 + c * c)
    return jnp.where(ok, weights, b / (1.0 + c * c) if rescale else b)


def _majorised_descent(gs, gb, r, w0, max_iters):
    """The dual for T > 2: projected steps on the quadratic majoriser (see cagrad_weights)."""
    lmax = jnp.maximum(jnp.linalg.eigvalsh(gs)[-1], 1e-12)

    def body(_, w):
        gw = gs @ w
        nw = jnp.sqrt(jnp.maximum(w @ gw, 1e-20))
        grad = gb + r * gw / nw
        step = nw / jnp.maximum(r * lmax, 1e-12)
        return project_simplex(w - step * grad)

    return jax.lax.fori_loop(0, max_iters, body, w0)


def _two_task_dual(gs: jax.Array, gb: jax.Array, r: jax.Array) -> jax.Array:
    """The T = 2 dual ``min_γ l(γ) + r sqrt(q(γ))`` over ``w = [γ, 1 - γ]``, without a loop.

    ``q(γ) = Aγ² + Bγ + C`` is ``||g_w||²`` and ``l(γ) = Dγ + E`` is ``<g_w, g_0>``. Squaring
    the stationarity condition ``D + r q'(γ) / (2 sqrt(q)) = 0`` gives the quadratic
    ``(A r² - D²) (4Aγ² + 4Bγ) + B² r² - 4 D² C = 0``; the objective is convex, so its minimum
    over [0, 1] is at a real root inside the interval or at an end. A grid of 129 points is
    added to the candidates for the degenerate cases (A or ``A r² - D²`` near zero).
    """
    a, b2, c12 = gs[0, 0], gs[1, 1], gs[0, 1]
    qa, qb, qc = a + b2 - 2.0 * c12, 2.0 * (c12 - b2), b2
    d = gb[0] - gb[1]
    k = qa * r * r - d * d
    a2, a1, a0 = 4.0 * qa * k, 4.0 * qb * k, qb * qb * r * r - 4.0 * d * d * qc
    disc = a1 * a1 - 4.0 * a2 * a0
    safe = (jnp.abs(a2) > 1e-12) & (disc >= 0)
    root = jnp.sqrt(jnp.maximum(disc, 0.0)) / jnp.where(safe, 2.0 * a2, 1.0)
    mid = -a1 / jnp.where(safe, 2.0 * a2, 1.0)
    roots = jnp.where(safe, jnp.stack([mid - root, mid + root]), 0.0)
    cand = jnp.concatenate([roots, jnp.linspace(0.0, 1.0, 129, dtype=gs.dtype)])
    cand = jnp.clip(cand, 0.0, 1.0)
    q = jnp.maximum(qa * cand * cand + qb * cand + qc, 0.0)
    f = d * cand + gb[1] + r * jnp.sqrt(q)
    gamma = cand[jnp.argmin(f)]
    return jnp.stack([gamma, 1.0 - gamma])


def cagrad(
    task_grads: Any,
    *,
    c: float = 0.4,
    rescale: bool = True,
    max_iters: int = 300,
    key: jax.Array | None = None,
) -> Any:
    """CAGrad: the update that maximises the worst task's improvement near the mean gradient.

    Solves the dual ``min_{w in simplex} <g_w, g_0> + c ||g_0|| ||g_w||`` on the float32
    Gram matrix (monotone projected-gradient majorisation, ``max_iters`` steps) and returns
    ``d = g_0 + c ||g_0|| / ||g_w|| * g_w`` with ``g_0`` the mean gradient.

    Scale convention: the *mean* scale (``g_0`` is the mean gradient); with
    ``rescale=True`` (the reference's default ``rescale=1``, also used by F-MTL,
    github.com/VietHoang1512/FS-MTL) the result is divided by ``1 + c^2``. T identical
    gradients ``g`` give ``(1 + c) / (1 + c^2) * g`` (``(1 + c) * g`` with
    ``rescale=False``); ``c = 0`` gives the mean.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      c: radius of the ball around the mean gradient, relative to its norm; ``c >= 0``.
      rescale: divide the result by ``1 + c^2``.
      max_iters: iterations of the inner solver.
      key: ignored (uniform aggregator signature).

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees, T < 2 or ``c < 0``.

    Example::

      >>> g = cljax.mtl.cagrad(stacked_grads, c=0.4)

    References:
      Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.
    """
    del key
    check_scalar(c, name="c", where="cagrad", low=0.0)
    check_int(max_iters, name="max_iters", where="cagrad", low=1)
    stacked, _ = stacked_grads(task_grads, name="cagrad", min_tasks=2)
    w = cagrad_weights(gram(stacked), c=c, rescale=rescale, max_iters=max_iters)
    return combine(stacked, w)
