"""The weighted sum in Pallas: one pass over θ0 and the T task vectors per leaf.

Per leaf b, the kernel reads a tile of θ0 and the T tiles of τ beside it, accumulates in
float32 (whatever the storage dtype: bfloat16/float16 task vectors are widened in registers)
and writes the tile once in θ0's dtype: ``(T + 1)`` reads and one write of the leaf, the
memory roofline. With aTLAS×K group ids, the coefficient of each entry is ``c[t, group]``,
selected in registers from the ``T·K`` scalars. Leaves share kernels
(``BlockSizes.leaves_per_call``); leaves below ``BlockSizes.xla_below`` entries go through
:func:`.xla.packed`.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from cljax.kernels import _dispatch
from cljax.kernels._weighted_sum import xla

__all__ = ["chunk", "weighted_sum_leaves"]


def _leaf_kernel(j, ins, shared, outs, part, *, num_tasks, num_groups, offsets, has_base, acc):
    """Leaf ``j``'s tile: θ0 + Σ_t c[t]·τ_t (or c[t, group]·τ_t), accumulated in ``acc``."""
    del part
    ins = list(ins)
    base_ref = ins.pop(0) if has_base else None
    tau_ref = ins.pop(0)
    k_j = num_groups[j]
    grp_ref = ins.pop(0) if k_j is not None else None
    c_ref, out_ref = shared[0], outs[0]
    shape = out_ref.shape
    out = base_ref[...].astype(acc) if base_ref is not None else jnp.zeros(shape, acc)
    gid = None if grp_ref is None else grp_ref[...].astype(jnp.int32)
    for t in range(num_tasks):  # unrolled: all T loads in flight at once
        x = tau_ref[t].astype(acc)
        if gid is None:
            scale = c_ref[offsets[j] + t].astype(acc)
        else:  # c[t, gid] by selects: T·K cheap VPU ops per entry, no gather
            k0 = offsets[j] + t * k_j
            scale = jnp.full(shape, c_ref[k0].astype(acc))
            for k in range(1, k_j):
                scale = jnp.where(gid == k, c_ref[k0 + k].astype(acc), scale)
        out = out + scale * x
    out_ref[...] = out.astype(out_ref.dtype)


def chunk(bases, taus, coeffs, groups, num_groups, out_dtypes, bs, *, poison=None):
    """One kernel over several leaves; ``poison`` (tests) is aliased to the tiled outputs."""
    num_tasks = taus[0].shape[0]
    acc = functools.reduce(
        jnp.promote_types,
        [xla.accum_dtype(o, c.dtype) for o, c in zip(out_dtypes, coeffs, strict=True)],
    )
    tls = [_dispatch.tiling(math.prod(t.shape[1:]), bs) for t in taus]
    inputs, offsets, at = [], [], 0
    for j, tl in enumerate(tls):
        xs = [] if bases is None else [_dispatch.to_tiles(bases[j], tl)]
        xs.append(_dispatch.to_tiles(taus[j], tl, stacked=True))
        if groups[j] is not None:
            xs.append(_dispatch.to_tiles(groups[j], tl))
        inputs.append(xs)
        offsets.append(at)
        at += coeffs[j].size
    cvec = jnp.concatenate([c.reshape(-1).astype(acc) for c in coeffs])
    cvec = jnp.pad(cvec, (0, _dispatch.next_pow2(at) - at))
    kernel = functools.partial(
        _leaf_kernel,
        num_tasks=num_tasks,
        num_groups=tuple(num_groups),
        offsets=tuple(offsets),
        has_base=bases is not None,
        acc=acc,
    )
    outs, _ = _dispatch.multi_call(
        kernel,
        tls,
        inputs,
        [cvec],
        bs,
        leaf_outputs=[[o] for o in out_dtypes],
        poison=None if poison is None else [[p] for p in poison],
        name="cljax_weighted_sum",
    )
    return [o[0] for o in outs], tls


def weighted_sum_leaves(bases, taus, coeffs, groups, num_groups, out_dtypes, bs):
    """Every leaf's θ0 + Σ_t c·τ_t (``bases`` may be ``None``): small leaves packed into one
    XLA pass, the others ``leaves_per_call`` to a kernel."""
    sizes = [math.prod(t.shape[1:]) for t in taus]
    small, chunks = _dispatch.split_leaves(sizes, bs)
    out = [None] * len(taus)
    pick = lambda xs, idx: None if xs is None else [xs[j] for j in idx]  # noqa: E731
    if small:
        ys = xla.packed(
            pick(bases, small),
            pick(taus, small),
            pick(coeffs, small),
            pick(groups, small),
            pick(out_dtypes, small),
        )
        for j, y in zip(small, ys, strict=True):
            out[j] = y
    for idx in chunks:
        ys, tls = chunk(
            pick(bases, idx),
            pick(taus, idx),
            pick(coeffs, idx),
            pick(groups, idx),
            pick(num_groups, idx),
            pick(out_dtypes, idx),
            bs,
        )
        for j, y, tl in zip(idx, ys, tls, strict=True):
            out[j] = _dispatch.from_tiles(y, tl, taus[j].shape[1:])
    return out
