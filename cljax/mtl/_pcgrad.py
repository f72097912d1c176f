"""PCGrad: projecting conflicting gradients."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax.mtl._gram import combine, gram, stacked_grads

__all__ = ["pcgrad", "pcgrad_weights"]


def pcgrad_weights(g: jax.Array, key: jax.Array) -> jax.Array:
    """PCGrad's weights on the raw task gradients, computed on the Gram matrix alone.

    Each projected gradient is a linear combination ``pc_i = sum_j C[i, j] g_j`` of the
    raw ones, so ``<pc_i, g_j> = (C G)[i, j]``: the sequential projections run on ``C``
    (T×T) and never touch the parameters. Returns ``C.sum(0)``.
    """
    t = g.shape[0]
    orders = jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(key, t))
    sq = jnp.maximum(jnp.diag(g), 1e-30)

    def task(i, c):
        def proj(k, c):
            j = orders[i, k]
            d = c[i] @ g[:, j]
            return c.at[i, j].add(jnp.where(d < 0, -d / sq[j], 0.0))

        return jax.lax.fori_loop(0, t, proj, c)

    c = jax.lax.fori_loop(0, t, task, jnp.eye(t, dtype=g.dtype))
    return c.sum(0)


def pcgrad(task_grads: Any, *, key: jax.Array) -> Any:
    """PCGrad: project each task gradient off the others' conflicting directions, then sum.

    For each task i, in a random order of the tasks drawn from ``key`` (one permutation per
    task i, as LibMTL), whenever ``<pc_i, g_j> < 0`` the projection
    ``pc_i -= <pc_i, g_j> / ||g_j||^2 * g_j`` is applied against the *original* gradient
    ``g_j``. Dot products are global over all leaves (float32 Gram matrix).

    Scale convention: the *sum* of the projected gradients (the reference's
    ``reduction="sum"``, also used by F-MTL); T identical gradients ``g`` give ``T * g``.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      key: PRNG key for the task orders.

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees, T < 2 or a missing key.

    Example::

      >>> g = cljax.mtl.pcgrad(stacked_grads, key=jax.random.key(0))

    References:
      Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
    """
    stacked, _ = stacked_grads(task_grads, name="pcgrad", min_tasks=2)
    if key is None:
        raise ValueError("pcgrad: key=None; pass a PRNG key for the random task order")
    return combine(stacked, pcgrad_weights(gram(stacked), key))
