"""IMTL-G: impartial multi-task learning, gradient part."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax.mtl._gram import combine, gram, stacked_grads

__all__ = ["imtl_g", "imtl_g_weights"]


def imtl_g_weights(g: jax.Array) -> jax.Array:
    """IMTL-G's weights from the Gram matrix (see :func:`imtl_g`)."""
    n = jnp.sqrt(jnp.maximum(jnp.diag(g), 1e-30))
    gu = g / n[None, :]  # <g_i, u_j>
    # D_k = g_0 - g_k, U_k = u_0 - u_k (k = 1..T-1); <D_k, U_l> and <g_0, U_l> from G.
    du = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]
    g0u = gu[0, 0] - gu[0, 1:]
    alpha = g0u @ jnp.linalg.pinv(du)
    return jnp.concatenate([1.0 - jnp.sum(alpha, keepdims=True), alpha])


def imtl_g(task_grads: Any, *, key: jax.Array | None = None) -> Any:
    """IMTL-G: the combination whose projections on every task's unit gradient are equal.

    Finds ``alpha`` with ``sum_i alpha_i = 1`` such that ``g = sum_i alpha_i g_i`` has the
    same inner product with every unit gradient ``u_i = g_i / ||g_i||``, in closed form
    ``alpha_{2:T} = g_1 U^T (D U^T)^+`` with ``D_k = g_1 - g_k``, ``U_k = u_1 - u_k``,
    evaluated on the float32 Gram matrix. The pseudo-inverse (not an inverse) makes
    collinear gradients well defined: T identical gradients give ``alpha = (1, 0, ...)``.

    Scale convention: weights sum to 1 (the *mean* scale, as LibMTL's ``IMTL`` gradient
    part); T identical gradients ``g`` give ``g``.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      key: ignored (uniform aggregator signature).

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees or T < 2.

    Example::

      >>> g = cljax.mtl.imtl_g(stacked_grads)

    References:
      Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.
    """
    del key
    stacked, _ = stacked_grads(task_grads, name="imtl_g", min_tasks=2)
    return combine(stacked, imtl_g_weights(gram(stacked)))
