"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax._checks import check_int
from cljax.mtl._gram import combine, gram, stacked_grads
from cljax.mtl._simplex import min_norm_weights

__all__ = ["mgda", "mgda_weights"]


def mgda_weights(g: jax.Array, *, normalize: bool = False, max_iters: int = 200) -> jax.Array:
    """MGDA's task weights from a Gram matrix (see :func:`mgda`)."""
    if normalize:
        n = jnp.sqrt(jnp.maximum(jnp.diag(g), 1e-30))
        w = min_norm_weights(g / n[:, None] / n[None, :], max_iters=max_iters)
        return w / n * g.shape[0]
    return min_norm_weights(g, max_iters=max_iters)


def mgda(
    task_grads: Any,
    *,
    normalize: bool = False,
    max_iters: int = 200,
    key: jax.Array | None = None,
) -> Any:
    """Multiple-gradient descent: the minimum-norm element of the convex hull of ``{g_i}``.

    Solves ``min_{w in simplex} ||sum_i w_i g_i||^2`` on the float32 Gram matrix of global
    dot products to round-off precision (accelerated projected gradient, then an exact
    KKT solve on the identified support; see ``cljax.mtl._simplex.min_norm_weights``) and
    returns ``sum_i w_i g_i``. If the origin is in the hull (Pareto-stationary point) the
    result is the zero vector.

    Scale convention: a convex combination (weights sum to 1), i.e. the *mean* scale; T
    identical gradients ``g`` give ``g``. With ``normalize=True`` each ``g_i`` is divided
    by its norm before the solve and the result is multiplied by T (LibMTL's
    ``mgda_gn="l2"`` and the NYUv2 script of github.com/VietHoang1512/FS-MTL): the weights on
    the raw gradients are ``T * w_i / ||g_i||`` and T identical gradients give
    ``T * g / ||g||``.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      normalize: divide each task gradient by its norm first (LibMTL ``mgda_gn="l2"``)
        and multiply the result by T.
      max_iters: projected-gradient iterations before the exact polish.
      key: ignored (uniform aggregator signature).

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees or T < 2.

    Example::

      >>> g = cljax.mtl.mgda([grads_a, grads_b])

    References:
      Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
      optimization", 2012. Sener & Koltun, "Multi-Task Learning as Multi-Objective
      Optimization", NeurIPS 2018.
    """
    del key
    check_int(max_iters, name="max_iters", where="mgda", low=1)
    stacked, _ = stacked_grads(task_grads, name="mgda", min_tasks=2)
    w = mgda_weights(gram(stacked), normalize=normalize, max_iters=max_iters)
    return combine(stacked, w)
