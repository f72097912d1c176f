"""Block dot products in XLA: the reference, and the library's path on the CPU.

:func:`leaf` computes one leaf's ``<g, τ_t>`` (per group with aTLAS×K group ids);
:func:`packed` handles many small leaves at once, concatenated (the Pallas backend sends
leaves below ``BlockSizes.xla_below`` entries there instead of launching a kernel for each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cljax.kernels import _dispatch

__all__ = ["leaf", "packed"]


def packed(gs, taus, groups, num_groups):
    """Small leaves concatenated: one product and one segment sum for all of them."""
    tau = _dispatch.pack(taus, jnp.float32, stacked=True)
    g = _dispatch.pack(gs, jnp.float32)
    seg, first, at = [], [], 0
    for x, gr, k in zip(gs, groups, num_groups, strict=True):
        first.append(at)
        ids = jnp.zeros((x.size,), jnp.int32) if gr is None else gr.reshape(-1).astype(jnp.int32)
        seg.append(jnp.clip(ids, 0, (k or 1) - 1) + at)
        at += k or 1
    prod = tau * g[None, :]  # [T, n]
    sums = jax.ops.segment_sum(prod.T, jnp.concatenate(seg), num_segments=at)  # [S, T]
    out = []
    for f, k in zip(first, num_groups, strict=True):
        out.append(sums[f] if k is None else sums[f : f + k].T)
    return out


def leaf(g, tau, groups, num_groups, acc=jnp.float32):
    """One fused multiply-reduce per leaf over the stacked τ, accumulated in ``acc``.

    Unpartitioned: one broadcast-multiply-reduce over all T slices at once, which XLA fuses
    into a single read of τ (per-task slices ``tau[t]`` are materialised as copies by
    XLA:CPU). With groups: a loop over t (``lax.map``) with a segment sum per slice, so the
    temporaries stay one leaf in size. A half-precision τ is widened inside the fused read.
    """
    g = g.astype(acc)
    if groups is None:
        return jnp.sum(tau.astype(acc) * g[None], axis=tuple(range(1, tau.ndim)))
    seg = groups.reshape(-1).astype(jnp.int32)

    def one(tau_t):
        prod = (tau_t.astype(acc) * g).reshape(-1)
        return jax.ops.segment_sum(prod, seg, num_segments=num_groups)

    return lax.map(one, tau)
