"""L2 to an anchor: ``weight * sum (theta - theta_anchor)^2`` (ZSCL) or its mean variant."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax._checks import check_scalar

__all__ = ["l2_anchor"]


def l2_anchor(
    params: ct.Params,
    anchor: ct.Params,
    *,
    weight: float = 1.0,
    reduction: Literal["sum", "mean"] = "sum",
    mask: Any = None,
) -> jax.Array:
    """Squared L2 distance of the parameters to an anchor, as a loss term.

    ``reduction="sum"`` is ZSCL's weight consolidation: the squared error **summed** over
    all elements (``l2 = 1`` in the reference, github.com/Thunderbeee/ZSCL
    ``mtil/scripts/ZSCL.sh``, over ~150M CLIP parameters, so its scale matters next to the
    task loss). ``"mean"`` divides by the number of elements counted.

    Args:
      params: current parameters.
      anchor: anchor parameters of the same structure (e.g. the previous task's weights).
      weight: coefficient, >= 0.
      reduction: ``"sum"`` or ``"mean"``.
      mask: optional tree of booleans (same structure): only True leaves count (e.g. from
        :func:`cljax.tree.rule_mask`).

    Returns:
      A float32 scalar. The anchor gets no gradient (``stop_gradient``).

    Raises:
      ValueError: on a negative weight, an unknown reduction, mismatched trees, or a mask
        that selects nothing.

    Example::

      loss = task_loss + l2_anchor(params, prev_params, weight=1.0)

    References:
      Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
      Vision-Language Models" (ZSCL), ICCV 2023.
    """
    check_scalar(weight, name="weight", where="l2_anchor", low=0.0)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"l2_anchor: {reduction=} must be 'sum' or 'mean'")
    ct.check_same_structure(params, anchor, names=("params", "anchor"))
    pl = [x for _, x in ct.leaves_with_paths(params)]
    al = [x for _, x in ct.leaves_with_paths(anchor)]
    ml = [True] * len(pl) if mask is None else [bool(m) for _, m in ct.leaves_with_paths(mask)]
    if len(ml) != len(pl):
        raise ValueError(f"l2_anchor: mask has {len(ml)} leaves, params {len(pl)}")
    total = jnp.zeros((), jnp.float32)
    count = 0
    for p, a, m in zip(pl, al, ml, strict=True):
        if not m:
            continue
        d = p.astype(jnp.float32) - jax.lax.stop_gradient(a).astype(jnp.float32)
        total = total + jnp.sum(d * d)
        count += int(jnp.size(p))
    if count == 0:
        raise ValueError("l2_anchor: the mask selects no parameter")
    if reduction == "mean":
        total = total / count
    return weight * total
