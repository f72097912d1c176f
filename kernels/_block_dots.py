"""``block_dots``: every ``<g_b, τ_t,b>`` in one pass over ``g`` (the aTLAS coefficient gradient).

For a leaf ``g`` (the cotangent of a composed parameter) and its stacked task vectors
``τ [T, *shape]``, the kernel reads each tile of ``g`` once and all T tiles of τ beside it,
and writes T partial dot products per grid step (``T·K`` with groups: one per group id of
aTLAS×K). A final sum over the few grid steps, in float32, gives ``[T]`` or ``[T, K]``.
Every step writes its own partial sums, so the grid is parallel on every backend (no
cross-step accumulation, which Triton grids do not order).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from cljax import tree as ct
from cljax.kernels import _dispatch
from cljax.kernels._dispatch import BlockSizes

__all__ = ["block_dots", "block_dots_leaf"]


def _block_sum(x: jax.Array) -> jax.Array:
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
            return jnp.where(slot == t, _block_sum(prod), res)
        for k in range(k_j):
            part_k = _block_sum(jnp.where(gid == k, prod, 0.0))
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


def _pallas_chunk(gs, taus, groups, num_groups, bs):
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


def _xla_packed(gs, taus, groups, num_groups):
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


def _pallas(gs, taus, groups, num_groups, bs):
    num_tasks = taus[0].shape[0]
    small, chunks = _dispatch.split_leaves([g.size for g in gs], bs)
    out: list[Any] = [None] * len(gs)
    pick = lambda xs, idx: [xs[j] for j in idx]  # noqa: E731
    if small:
        ys = _xla_packed(
            pick(gs, small), pick(taus, small), pick(groups, small), pick(num_groups, small)
        )
        for j, y in zip(small, ys, strict=True):
            out[j] = y
    for idx in chunks:
        parts, tls = _pallas_chunk(
            pick(gs, idx), pick(taus, idx), pick(groups, idx), pick(num_groups, idx), bs
        )
        sums = leaf_sums(parts, tls, parts.shape[-1])
        for row, j in enumerate(idx):
            k = num_groups[j]
            d = sums[row, : num_tasks * (k or 1)]
            out[j] = d if k is None else d.reshape(num_tasks, k)
    return out


def _xla(g, tau, groups, num_groups, acc=jnp.float32):
    """Reference: one fused multiply-reduce per leaf over the stacked τ, accumulated in ``acc``.

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


def _forward(gs, taus, groups, num_groups, impl, bs, accs=None):
    """Every leaf's ``<g, τ_t>`` (``[T]``, or ``[T, K]`` with groups): lists in, list out.

    ``accs``: per leaf, the accumulation dtype of the XLA reference (default float32; the
    weighted sum's backward passes float64 for float64 coefficients). The Pallas kernels
    accumulate in float32.
    """
    if impl == "pallas":
        return _pallas(gs, taus, groups, num_groups, bs)
    accs = [jnp.float32] * len(gs) if accs is None else accs
    return [_xla(*a) for a in zip(gs, taus, groups, num_groups, accs, strict=True)]


@functools.cache
def _op(impl: str, bs: BlockSizes, num_groups: tuple[int | None, ...]):
    """A custom-VJP ``(gs, τs, groups) -> dots`` over tuples of leaves."""
    from cljax.kernels import _weighted_sum  # the two ops are each other's transposes

    @jax.custom_vjp
    def op(gs, taus, groups):
        return tuple(_forward(gs, taus, groups, num_groups, impl, bs))

    def fwd(gs, taus, groups):
        gv, tv = [x.value for x in gs], [x.value for x in taus]
        grv = [None if x is None else x.value for x in groups]
        out = tuple(_forward(gv, tv, grv, num_groups, impl, bs))
        # Only what the backward needs; zero-size arrays carry the dtypes of what is asked.
        res = (
            tuple(g if t.perturbed else None for g, t in zip(gv, taus, strict=True)),
            tuple(t if g.perturbed else None for t, g in zip(tv, gs, strict=True)),
            tuple(grv),
            tuple(jnp.zeros((0,), g.value.dtype) if g.perturbed else None for g in gs),
            tuple(jnp.zeros((0,), t.value.dtype) if t.perturbed else None for t in taus),
        )
        return out, res

    def bwd(res, cts):
        gv, tv, grv, g_flags, tau_flags = res
        cts = [jnp.zeros(c.shape, jnp.float32) if isinstance(c, SymbolicZero) else c for c in cts]
        cts = [jnp.asarray(c, jnp.float32) for c in cts]
        dgs = [None] * len(cts)
        want = [j for j, f in enumerate(g_flags) if f is not None]
        if want:  # d<g, τ_t>/dg = Σ_t ct[t] τ_t: a weighted sum, same dispatch
            pick = lambda xs: [xs[j] for j in want]  # noqa: E731
            ys = _weighted_sum._forward(
                None, pick(tv), pick(cts), pick(grv), pick(num_groups), impl, bs
            )
            for j, y in zip(want, ys, strict=True):
                dgs[j] = y.astype(g_flags[j].dtype)
        dtaus = []
        for f, g, c, gr in zip(tau_flags, gv, cts, grv, strict=True):
            if f is None:
                dtaus.append(None)
                continue
            g32 = g.astype(jnp.float32)  # d<g, τ_t>/dτ_t = ct[t] g
            rows = [_weighted_sum.per_entry(c[t], gr) * g32 for t in range(len(c))]
            dtaus.append(jnp.stack(rows).astype(f.dtype))
        return tuple(dgs), tuple(dtaus), tuple(None for _ in grv)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


def _apply(gs, taus, groups, num_groups, implementation, block_sizes, where) -> list[jax.Array]:
    for g, t, gr, k in zip(gs, taus, groups, num_groups, strict=True):
        _check_leaf(g, t, gr, k, where)
    impl = _dispatch.resolve(implementation, where=where)
    bs = _dispatch.block_sizes_or_default(block_sizes)
    return list(_op(impl, bs, tuple(num_groups))(tuple(gs), tuple(taus), tuple(groups)))


def _check_leaf(g, tau, groups, num_groups, where):
    if tau.ndim < 1 or tuple(tau.shape[1:]) != tuple(g.shape):
        raise ValueError(
            f"{where}: task vectors of shape {tuple(tau.shape)} do not stack leaves of shape "
            f"{tuple(g.shape)} (expected [T, *shape])"
        )
    if groups is None:
        if num_groups is not None:
            raise ValueError(f"{where}: {num_groups=} given without group ids")
        return
    if num_groups is None or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{where}: {num_groups=} must be a positive int when groups are given")
    if tuple(groups.shape) != tuple(g.shape):
        raise ValueError(
            f"{where}: group ids of shape {tuple(groups.shape)} for a leaf of shape "
            f"{tuple(g.shape)}"
        )
    if not jnp.issubdtype(groups.dtype, jnp.integer):
        raise ValueError(f"{where}: group ids must be integers, got {groups.dtype}")


def block_dots_leaf(
    g: jax.Array,
    tau: jax.Array,
    groups: jax.Array | None = None,
    *,
    num_groups: int | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``<g, τ_t>`` for every task t (or per group of entries), all T in one pass over ``g``.

    Args:
      g: one leaf, e.g. ``dL/dθ_b`` for a composed block.
      tau: the stacked task vectors of that leaf, ``[T, *g.shape]`` (any float dtype).
      groups: optional integer group id in ``[0, num_groups)`` per entry of ``g`` (aTLAS×K).
      num_groups: K, required with ``groups``.
      implementation: ``None`` (Pallas on GPU/TPU, XLA on the CPU), ``"xla"`` or
        ``"pallas"`` (interpret mode on the CPU).
      block_sizes: tile sizes for the Pallas kernel (default per platform).

    Returns:
      float32 ``[T]``, or ``[T, K]`` with groups; accumulated in float32.

    Raises:
      ValueError: on mismatched shapes, non-integer group ids, a missing ``num_groups``,
        or an unknown implementation.

    Example:
      >>> block_dots_leaf(jnp.ones(5), jnp.ones((3, 5)))
      Array([5., 5., 5.], dtype=float32)

    References:
      Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic
      Scaling", NeurIPS 2024: ``dL/dΛ[t, b] = <dL/dθ_b, τ_{t, b}>``.
    """
    g, tau = jnp.asarray(g), jnp.asarray(tau)
    groups = None if groups is None else jnp.asarray(groups)
    return _apply([g], [tau], [groups], [num_groups], implementation, block_sizes, "block_dots")[0]


def block_dots(
    grads: ct.PyTree,
    task_vectors: Sequence[ct.PyTree] | ct.PyTree,
    *,
    groups: Sequence[jax.Array | None] | None = None,
    num_groups: int | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> ct.PyTree:
    """Per leaf, ``<g_b, τ_t,b>`` for all T task vectors: the aTLAS coefficient gradient.

    Args:
      grads: a tree of cotangents ``dL/dθ`` (one leaf per block).
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees.
      groups: optional, per leaf in flattening order, an integer array of group ids or
        ``None`` (that leaf then gives ``[T]``); see ``atlas.partition_masks``.
      num_groups: K for the grouped leaves.
      implementation: ``None`` | ``"xla"`` | ``"pallas"`` (see :func:`block_dots_leaf`).
      block_sizes: Pallas tile sizes.

    Returns:
      A tree of ``grads``' structure with float32 leaves ``[T]`` (or ``[T, K]``).

    Raises:
      ValueError: on mismatched trees (first differing path named) or bad arguments.

    Example:
      >>> dots = block_dots(jax.grad(loss)(theta), task_vectors)

    References:
      Zhang et al., aTLAS, NeurIPS 2024.
    """
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    ct.check_same_structure(grads, tvs, names=("grads", "task_vectors"), b_leading=(t,))
    leaves, treedef = jax.tree.flatten(grads)
    grp = _per_leaf(groups, len(leaves), "block_dots")
    out = _apply(
        [jnp.asarray(g) for g in leaves],
        [jnp.asarray(t) for t in jax.tree.leaves(tvs)],
        [None if gi is None else jnp.asarray(gi) for gi in grp],
        [None if gi is None else num_groups for gi in grp],
        implementation,
        block_sizes,
        "block_dots",
    )
    return jax.tree.unflatten(treedef, out)


def _per_leaf(groups, n, where):
    if groups is None:
        return [None] * n
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{where}: groups has {len(groups)} entries for {n} leaves")
    return groups
