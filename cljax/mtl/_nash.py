"""Nash-MTL: the Nash bargaining solution of the task gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax._checks import check_int
from cljax.mtl._gram import combine, gram, stacked_grads

__all__ = ["nash_mtl", "nash_mtl_weights"]


def nash_mtl_weights(g: jax.Array, *, max_iters: int = 20) -> jax.Array:
    """Nash-MTL's weights: the positive solution of ``(G alpha)_i = 1 / alpha_i``.

    ``G`` is first divided by its Frobenius norm, as in the reference. The system is the
    stationarity condition of the strictly convex, self-concordant potential
    ``phi(alpha) = alpha^T G alpha / 2 - sum_i log alpha_i``, minimised by damped Newton
    steps (step ``1 / (1 + lambda)`` while the Newton decrement ``lambda > 1/4``, full steps
    after), which stay in ``alpha > 0`` and converge quadratically.
    """
    t = g.shape[0]
    fro = jnp.sqrt(jnp.sum(g * g))
    ok = fro > 0
    gs = g / jnp.where(ok, fro, 1.0)
    alpha0 = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(gs), 1e-12))

    def body(_, a):
        grad = gs @ a - 1.0 / a
        hess = gs + jnp.diag(1.0 / (a * a))
        delta = jnp.linalg.solve(hess, grad)
        dec = jnp.sqrt(jnp.maximum(grad @ delta, 0.0))
        step = jnp.where(dec > 0.25, 1.0 / (1.0 + dec), 1.0)
        a_new = a - step * delta
        return jnp.where(jnp.all(jnp.isfinite(a_new)) & jnp.all(a_new > 0), a_new, a)

    a = jax.lax.fori_loop(0, max_iters, body, alpha0)
    return jnp.where(ok, a, jnp.ones((t,), g.dtype))


def nash_mtl(task_grads: Any, *, max_iters: int = 20, key: jax.Array | None = None) -> Any:
    """Nash-MTL: weights ``alpha > 0`` with ``alpha_i <g_i, sum_j alpha_j g_j> = 1``.

    The Nash bargaining solution of the tasks (each task's utility is ``log <g_i, d>``):
    ``d = sum_i alpha_i g_i`` with ``G alpha = 1 / alpha`` for the Gram matrix normalised
    by its Frobenius norm (as the reference). Solved exactly by damped Newton on a convex
    potential, not by the reference's sequence of cvxpy problems (which stops after 20
    iterations with a tolerance); the reference's gradient clipping (``max_norm=1``) is
    left to the optimiser (``optax.clip_by_global_norm``).

    Scale convention: the *sum* scale: T identical gradients ``g`` give ``T * g``; the
    weights are invariant to a common rescaling of the gradients, so ``d`` scales
    linearly with them.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      max_iters: Newton iterations.
      key: ignored (uniform aggregator signature).

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees or T < 2.

    Example::

      >>> g = cljax.mtl.nash_mtl(stacked_grads)

    References:
      Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.
    """
    del key
    check_int(max_iters, name="max_iters", where="nash_mtl", low=1)
    stacked, _ = stacked_grads(task_grads, name="nash_mtl", min_tasks=2)
    return combine(stacked, nash_mtl_weights(gram(stacked), max_iters=max_iters))
