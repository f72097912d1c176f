"""Block dot products in Pallas: every ``<g_b, τ_t,b>`` in one pass over ``g``.

For a leaf ``g`` (the cotangent of a composed parameter) and its stacked task vectors
``τ [T, *shape]``, the kernel reads each tile of ``g`` once and all T tiles of τ beside it,
and writes T partial dot products per grid step (``T·K`` with groups: one per group id of
aTLAS×K). A final sum over the few grid steps, in float32, gives ``[T]`` or ``[T, K]``.
Every step writes its own partial sums, so the grid is parallel on every backend (no
cross-step accumulation, which Triton grids do not order). Leaves below
``BlockSizes.xla_below`` entries go through :func:`.xla.packed`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cljax.kernels import _dispatch
from cljax.kernels._block_dots import xla

__all__ = ["block_dots_leaves", "block_sum", "chunk", "leaf_sums"]


def block_sum(x: jax.Array) -> jax.Array:
    """Sum of a 2-D block as a ``(1, 1)`` array (two keep-dims reductions lower everywhere)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _leaf_kernel(j, ins, shared, outs, part, *, num_tasks, num_groups):
    """Leaf ``j``'s tile: its T (or T·K) partial dot products, in the program's row."""
    del shared, outs
    k_j = num_groups[j]
    g_ref, tau_ref = ins[0], ins[1]
    g = g_ref[...].astype(jnp.float32)
    gid = None if k_j is None else ins[2][...].astype(jnp.int32)
    width = part.shape[-1]
    slot = lax.broadcasted_iota(jnp.int32, (1, width), 1)

    def task(t, res):  # a loop, not unrolled: one reduction per task in the kernel's code
        prod = tau_ref[t].astype(jnp.float32) * g
        if gid is None:
            return jnp.where(slot == t, block_sum(prod), res)
        for k in range(k_j):
            part_k = block_sum(jnp.where(gid == k, prod, 0.0))
            res = jnp.where(slot == t * k_j + k, part_k, res)
        return res

    part[...] = lax.fori_loop(0, num_tasks, task, jnp.zeros((1, width), jnp.float32))


def leaf_sums(parts: jax.Array, tls: Sequence[_dispatch.Tiling], width: int) -> jax.Array:
    """``[L, width]``: the per-block partial sums of each leaf added up (one small matmul)."""
    ends = np.cumsum([tl.num_blocks for tl in tls])
    block = lax.broadcasted_iota(jnp.int32, (len(tls), parts.shape[0]), 1)
    lo = jnp.asarray(np.concatenate([[0], ends[:-1]]), jnp.int32)[:, None]
    hi = jnp.asarray(ends, jnp.int32)[:, None]
    owner = ((block >= lo) & (block < hi)).astype(jnp.float32)
    return jnp.dot(owner, parts[:, 0, :width], precision=lax.Precision.HIGHEST)


def chunk(gs, taus, groups, num_groups, bs):
    """Per-block partial dots ``[num_blocks, 1, width]`` of several leaves, and their tilings."""
    num_tasks = taus[0].shape[0]
    width = _dispatch.next_pow2(max(num_tasks * (k or 1) for k in num_groups))
    tls = [_dispatch.tiling(g.size, bs) for g in gs]
    inputs = []
    for g, tau, gr, tl in zip(gs, taus, groups, tls, strict=True):
        xs = [_dispatch.to_tiles(g, tl), _dispatch.to_tiles(tau, tl, stacked=True)]
        if gr is not None:
            xs.append(_dispatch.to_tiles(gr, tl))
        inputs.append(xs)
    kernel = functools.partial(_leaf_kernel, num_tasks=num_tasks, num_groups=tuple(num_groups))
    _, parts = _dispatch.multi_call(
        kernel, tls, inputs, [], bs, partial_width=width, name="cljax_block_dots"
    )
    return parts, tls


def block_dots_leaves(gs, taus, groups, num_groups, bs):
    """Every leaf's ``<g, τ_t>``: small leaves packed into one XLA pass, the others
    ``leaves_per_call`` to a kernel."""
    num_tasks = taus[0].shape[0]
    small, chunks = _dispatch.split_leaves([g.size for g in gs], bs)
    out: list[Any] = [None] * len(gs)
    pick = lambda xs, idx: [xs[j] for j in idx]  # noqa: E731
    if small:
        ys = xla.packed(
            pick(gs, small), pick(taus, small), pick(groups, small), pick(num_groups, small)
        )
        for j, y in zip(small, ys, strict=True):
            out[j] = y
    for idx in chunks:
        parts, tls = chunk(
            pick(gs, idx), pick(taus, idx), pick(groups, idx), pick(num_groups, idx), bs
        )
        sums = leaf_sums(parts, tls, parts.shape[-1])
        for row, j in enumerate(idx):
            k = num_groups[j]
            d = sums[row, : num_tasks * (k or 1)]
            out[j] = d if k is None else d.reshape(num_tasks, k)
    return out
