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

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from cljax import tree as ct
from cljax.kernels import _dispatch
from cljax.kernels._dispatch import BlockSizes

__all__ = ["block_dots", "block_dots_leaf"]


def _block_sum(x: jax.Array) -> jax.Array:
    """Sum of a 2-D block as a ``(1, 1)`` array (two keep-dims reductions lower everywhere)."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _kernel(*refs, num_tasks: int, num_groups: int | None):
    if num_groups is None:
        g_ref, tau_ref, out_ref = refs
        grp_ref = None
    else:
        g_ref, tau_ref, grp_ref, out_ref = refs
    g = g_ref[...].astype(jnp.float32)
    width = out_ref.shape[-1]
    slot = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    res = jnp.zeros((1, width), jnp.float32)
    gid = None if grp_ref is None else grp_ref[...].astype(jnp.int32)
    for t in range(num_tasks):
        prod = tau_ref[t].astype(jnp.float32) * g
        if gid is None:
            res = jnp.where(slot == t, _block_sum(prod), res)
        else:
            for k in range(num_groups):
                part = _block_sum(jnp.where(gid == k, prod, 0.0))
                res = jnp.where(slot == t * num_groups + k, part, res)
    out_ref[...] = res


def _pallas_tiles(
    g: jax.Array,
    tau: jax.Array,
    groups: jax.Array | None,
    num_groups: int | None,
    tl: _dispatch.Tiling,
    bs: BlockSizes,
) -> jax.Array:
    """Per-block partial dots ``[num_blocks, 1, width]`` of tiled inputs (tests read this)."""
    from jax.experimental import pallas as pl

    num_tasks = tau.shape[0]
    width = _dispatch.next_pow2(num_tasks * (num_groups or 1))
    tile = pl.BlockSpec((tl.block_rows, tl.lanes), lambda i: (i, 0))
    in_specs = [tile, pl.BlockSpec((num_tasks, tl.block_rows, tl.lanes), lambda i: (0, i, 0))]
    args = [g, tau]
    if groups is not None:
        in_specs.append(tile)
        args.append(groups)
    return pl.pallas_call(
        functools.partial(_kernel, num_tasks=num_tasks, num_groups=num_groups),
        out_shape=jax.ShapeDtypeStruct((tl.num_blocks, 1, width), jnp.float32),
        grid=(tl.num_blocks,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, 1, width), lambda i: (i, 0, 0)),
        interpret=_dispatch.interpret_mode(),
        compiler_params=_dispatch.compiler_params(bs),
        name="cljax_block_dots",
    )(*args)


def _pallas(g, tau, groups, num_groups, bs):
    num_tasks = tau.shape[0]
    tl = _dispatch.tiling(g.size, bs)
    gr = None if groups is None else _dispatch.to_tiles(groups, tl)
    parts = _pallas_tiles(
        _dispatch.to_tiles(g, tl), _dispatch.to_tiles(tau, tl, stacked=True), gr, num_groups, tl, bs
    )
    out = jnp.sum(parts[:, 0, : num_tasks * (num_groups or 1)], axis=0)
    return out if num_groups is None else out.reshape(num_tasks, num_groups)


def _xla(g, tau, groups, num_groups):
    """Reference: slice by slice (XLA:CPU reduces a stacked leading axis slowly)."""
    g = g.astype(jnp.float32)
    rows = []
    for t in range(tau.shape[0]):
        prod = tau[t].astype(jnp.float32) * g
        if groups is None:
            rows.append(jnp.sum(prod))
        else:
            seg = groups.reshape(-1).astype(jnp.int32)
            rows.append(jax.ops.segment_sum(prod.reshape(-1), seg, num_segments=num_groups))
    return jnp.stack(rows)


def _forward(g, tau, groups, num_groups, impl, bs):
    if impl == "pallas":
        return _pallas(g, tau, groups, num_groups, bs)
    return _xla(g, tau, groups, num_groups)


@functools.cache
def _op(impl: str, bs: BlockSizes, num_groups: int | None):
    """A custom-VJP ``(g, τ, groups) -> dots``; its VJP w.r.t. ``g`` is a weighted sum."""
    from cljax.kernels import _weighted_sum  # the two ops are each other's transposes

    @jax.custom_vjp
    def op(g, tau, groups):
        return _forward(g, tau, groups, num_groups, impl, bs)

    def fwd(g, tau, groups):
        groups = None if groups is None else groups.value
        out = _forward(g.value, tau.value, groups, num_groups, impl, bs)
        # Only what the backward needs; zero-size arrays carry the dtypes of what is asked.
        res = (
            g.value if tau.perturbed else None,
            tau.value if g.perturbed else None,
            groups,
            jnp.zeros((0,), g.value.dtype) if g.perturbed else None,
            jnp.zeros((0,), tau.value.dtype) if tau.perturbed else None,
        )
        return out, res

    def bwd(res, ct_out):
        g, tau, groups, g_flag, tau_flag = res
        if isinstance(ct_out, SymbolicZero):
            ct_out = jnp.zeros(ct_out.aval.shape, jnp.float32)
        ct_out = jnp.asarray(ct_out, jnp.float32)
        dg = dtau = None
        if g_flag is not None:  # d<g, τ_t>/dg = Σ_t ct[t] τ_t: a weighted sum, same dispatch
            dg = _weighted_sum._forward(None, tau, ct_out, groups, num_groups, impl, bs)
            dg = dg.astype(g_flag.dtype)
        if tau_flag is not None:  # d<g, τ_t>/dτ_t = ct[t] g
            g32 = g.astype(jnp.float32)
            rows = [_weighted_sum.per_entry(ct_out[t], groups) * g32 for t in range(len(ct_out))]
            dtau = jnp.stack(rows).astype(tau_flag.dtype)
        return dg, dtau, None

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


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
    _check_leaf(g, tau, groups, num_groups, "block_dots")
    impl = _dispatch.resolve(implementation, where="block_dots")
    bs = _dispatch.block_sizes_or_default(block_sizes)
    return _op(impl, bs, num_groups)(g, tau, groups)


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
    out = [
        block_dots_leaf(
            g,
            tau,
            gi,
            num_groups=None if gi is None else num_groups,
            implementation=implementation,
            block_sizes=block_sizes,
        )
        for g, tau, gi in zip(leaves, jax.tree.leaves(tvs), grp, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _per_leaf(groups, n, where):
    if groups is None:
        return [None] * n
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{where}: groups has {len(groups)} entries for {n} leaves")
    return groups
