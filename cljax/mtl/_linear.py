"""Linear scalarisation (equal weighting and fixed task weights)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from cljax.mtl._gram import combine, stacked_grads

__all__ = ["linear"]


def linear(
    task_grads: Any, *, weights: ArrayLike | None = None, key: jax.Array | None = None
) -> Any:
    """Linear scalarisation: ``sum_i weights[i] * g_i``; equal weighting (EW) by default.

    Scale convention: with ``weights=None`` the weights are ``1/T`` (the *mean* of the task
    gradients, the equal-weighting baseline of the F-MTL reference,
    github.com/VietHoang1512/FS-MTL); T
    identical gradients ``g`` give ``g``. LibMTL's ``EW`` sums the losses instead: pass
    ``weights=jnp.ones(T)`` for that. Explicit weights are used as given.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T gradient trees.
      weights: ``[T]`` task weights, or ``None`` for ``1/T`` each.
      key: ignored (the aggregator signature ``aggregator(task_grads, *, key)`` that every
        aggregator shares).

    Returns:
      One gradient tree.

    Raises:
      ValueError: on mismatched trees or weights of the wrong shape.

    Example::

      >>> g = cljax.mtl.linear(stacked_grads)             # mean
      >>> g = cljax.mtl.linear(stacked_grads, weights=[1.0, 0.5])  # fixed weights

    References:
      Caruana, "Multitask Learning", Machine Learning 28, 1997. Xin et al., "Do Current
      Multi-Task Optimization Methods in Deep Learning Even Help?", NeurIPS 2022.
    """
    del key
    stacked, t = stacked_grads(task_grads, name="linear")
    if weights is None:
        w = jnp.full((t,), 1.0 / t, jnp.float32)
    else:
        w = jnp.asarray(weights)
        if w.shape != (t,):
            raise ValueError(f"linear: weights.shape={w.shape} must be ({t},) for T={t} tasks")
    return combine(stacked, w)
