"""GradDrop: sign-consistency gradient dropout."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax._checks import check_scalar
from cljax.mtl._gram import stacked_grads

__all__ = ["graddrop"]


def graddrop(task_grads: Any, *, key: jax.Array, leak: float = 0.0) -> Any:
    """GradDrop: per coordinate, keep only the gradients of one sign, chosen at random.

    Per coordinate, the sign purity ``P = (1 + sum_i g_i / sum_i |g_i|) / 2`` and a uniform
    draw ``U`` decide: positive components are kept where ``P > U``, negative ones where
    ``P < U``; the kept components are summed. ``leak`` in [0, 1] lets a fraction of each
    dropped component through (LibMTL's ``leak``). Applied here to parameter gradients
    (LibMTL applies it to the gradients of a shared representation); element-wise, so it
    needs no Gram matrix.

    Scale convention: the *sum* scale: T identical gradients ``g`` give ``T * g``.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      key: PRNG key for the uniform draws (one per coordinate, shared by the tasks).
      leak: fraction of the dropped components that is kept.

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees, T < 2, ``leak`` outside [0, 1] or a missing key.

    Example::

      >>> g = cljax.mtl.graddrop(stacked_grads, key=jax.random.key(0))

    References:
      Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
      Dropout", NeurIPS 2020.
    """
    check_scalar(leak, name="leak", where="graddrop", low=0.0, high=1.0)
    stacked, _ = stacked_grads(task_grads, name="graddrop", min_tasks=2)
    if key is None:
        raise ValueError("graddrop: key=None; pass a PRNG key for the sign draws")
    leaves, treedef = jax.tree.flatten(stacked)
    keys = jax.random.split(key, len(leaves))

    def leaf(x, k):
        # Sums over tasks slice by slice (ct.sum_slices: XLA:CPU reduces a leading axis slowly).
        rows = [ct.to_accum(x[t]) for t in range(x.shape[0])]
        total, mag = ct.sum_slices(rows), ct.sum_slices([jnp.abs(r) for r in rows])
        p = 0.5 * (1.0 + total / (mag + 1e-12))
        u = jax.random.uniform(k, p.shape, p.dtype)
        up, down = p > u, p < u
        kept = [jnp.where((up & (r > 0)) | (down & (r < 0)), r, leak * r) for r in rows]
        return ct.sum_slices(kept).astype(x.dtype)

    return jax.tree.unflatten(treedef, [leaf(x, k) for x, k in zip(leaves, keys, strict=True)])
