"""Aligned-MTL: aligning the principal components of the task gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax.mtl._gram import combine, gram, stacked_grads

__all__ = ["aligned_mtl", "aligned_mtl_weights"]


def aligned_mtl_weights(g: jax.Array) -> jax.Array:
    """Aligned-MTL's weights from the Gram matrix (see :func:`aligned_mtl`)."""
    t = g.shape[0]
    lam, v = jnp.linalg.eigh(g)
    tol = jnp.max(lam) * t * jnp.finfo(g.dtype).eps
    keep = lam > tol
    lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    b = jnp.sqrt(jnp.where(jnp.isfinite(lam_min), lam_min, 0.0)) * (v * inv_sqrt) @ v.T
    return b.sum(0)


def aligned_mtl(task_grads: Any, *, key: jax.Array | None = None) -> Any:
    """Aligned-MTL: the stable, condition-number-one combination of the task gradients.

    With the eigen-decomposition ``G = V diag(lambda) V^T`` of the Gram matrix (rank r),
    the balancing matrix is ``B = sqrt(lambda_min) V_r diag(lambda_r^-1/2) V_r^T`` and the
    weights are ``B 1`` (``lambda_min`` the smallest non-zero eigenvalue, the ``"min"``
    scale mode of the reference and LibMTL).

    Scale convention: the *sum* scale: T orthogonal gradients of equal norm, or T identical
    gradients ``g``, give their sum (``T * g`` for identical ones).

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      key: ignored (uniform aggregator signature).

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees or T < 2.

    Example::

      >>> g = cljax.mtl.aligned_mtl(stacked_grads)

    References:
      Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
      CVPR 2023.
    """
    del key
    stacked, _ = stacked_grads(task_grads, name="aligned_mtl", min_tasks=2)
    return combine(stacked, aligned_mtl_weights(gram(stacked)))
