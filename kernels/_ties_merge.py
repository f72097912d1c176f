"""``ties``: TIES-merging, global scope, with the threshold op and a fused merge pass.

Semantics (those of ``cljax.merging.ties`` with ``scope="global"``, the paper's): for each task
t, keep the entries with ``|τ_t| >= v_t``, ``v_t`` the k-th largest magnitude of the whole task
vector (all leaves), ``k = int(density·N) + 1`` (the paper's code, :func:`keep_count`), ties
at ``v_t`` kept; elect ``γ = sign(Σ_t τ̂_t)``, zero sums taking the majority sign
``sign(Σ_p γ_p)`` over all entries; merge the trimmed values that agree with γ (their mean,
count clamped to 1, or their sum); ``θ = θ0 + λ·τ_m``.

Passes over the task vectors (T·N entries each; nothing of size T·N is written):

1. **Threshold**: ``v_t`` from the TIES threshold op (:mod:`cljax.kernels._ties_threshold`),
   exactly the value a full sort gives: its XLA counting search in the XLA implementation, its
   Pallas radix select (5 passes for bfloat16, 11 for float32, one kernel each) in the Pallas
   implementation, which reads the tiles laid out here once for every pass.
2. **Vote.** The global majority sign needs every coordinate's elected sign first: one pass
   sums ``sign(Σ_t τ̂_t)`` (a Pallas kernel writes per-block partial counts).
3. **Elect and merge**, fused: per tile, trim all T slices, elect, disjoint-merge, scale, add
   θ0, write once in θ0's dtype.

Magnitudes are compared in float32 (float64 leaves are rounded); inputs must be finite.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from cljax import tree as ct
from cljax.kernels import _dispatch
from cljax.kernels._block_dots.pallas import block_sum
from cljax.kernels._dispatch import BlockSizes
from cljax.kernels._ties_threshold import keep_count, ties_threshold
from cljax.kernels._ties_threshold.pallas import MAX_COUNT, Tiled, radix_kth_bits

__all__ = ["keep_count", "kth_largest_magnitude", "ties"]

_MERGES = ("mean", "sum")


def kth_largest_magnitude(
    task_vectors: Sequence[ct.PyTree] | ct.PyTree,
    k: int,
    *,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """The k-th largest ``|τ_t|`` over all leaves of each task vector, without a sort.

    The TIES threshold op (:func:`cljax.kernels._ties_threshold.ties_threshold`) on a tree:
    the value a full sort would give (module docstring of :mod:`cljax.kernels._ties_threshold`).

    Args:
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees; every
        floating leaf counts.
      k: the rank, ``1 <= k <= N`` (N entries per task vector).
      implementation: ``None`` (Pallas on GPU/TPU, XLA on the CPU), ``"xla"`` or
        ``"pallas"``.
      block_sizes: Pallas tile sizes.

    Returns:
      float32 ``[T]``.

    Raises:
      ValueError: if k is outside ``[1, N]`` or N does not fit the implementation's counts.

    Example:
      >>> kth_largest_magnitude(jnp.array([[3.0, -5.0, 1.0]]), 2)
      Array([3.], dtype=float32)

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
      (the global top-k trim).
    """
    tvs = ct.as_stacked(task_vectors)
    leaves = [x for x in jax.tree.leaves(tvs) if ct.is_float(x)]
    n = sum(math.prod(x.shape[1:]) for x in leaves)
    _check_count(n, "kth_largest_magnitude")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{k=} must be an int in [1, N={n}] (kth_largest_magnitude)")
    bits = ties_threshold(leaves, k, implementation=implementation, block_sizes=block_sizes)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _check_count(n: int, where: str) -> None:
    if n > MAX_COUNT:
        raise ValueError(f"{where}: N={n} entries per task overflow the int32 counts")


# ----------------------------------------------------------------------------- the XLA merge


def trim(slices: Sequence[jax.Array], thr: jax.Array) -> list[jax.Array]:
    """Step 1 of TIES on the T slices of one array: entries whose float32 magnitude is below
    their task's threshold ``thr[t]`` (float32) become 0; values in the accumulation dtype
    (float32, float64 for float64 inputs)."""
    return [
        jnp.where(jnp.abs(x.astype(jnp.float32)) >= thr[t], x.astype(ct.accum_dtype(x.dtype)), 0)
        for t, x in enumerate(slices)
    ]


def sign_votes(slices: Sequence[jax.Array], thr: jax.Array) -> jax.Array:
    """``Σ sign(Σ_t τ̂_t)`` over the entries of one array (int32): its share of the vote
    that gives the majority sign."""
    total = ct.sum_slices(trim(slices, thr))
    return jnp.sum(total > 0, dtype=jnp.int32) - jnp.sum(total < 0, dtype=jnp.int32)


def disjoint_merge(
    base: jax.Array | None,
    slices: Sequence[jax.Array],
    thr: jax.Array,
    majority: jax.Array,
    scale: ArrayLike,
    *,
    merge: str,
    out_dtype=None,
    mark: ArrayLike = False,
) -> jax.Array:
    """Steps 1-3 of TIES on the T slices of one array, elementwise: trim, elect, merge.

    The one XLA implementation of the merge pass: the merging code (eager and jitted, both
    scopes) and the XLA path of :func:`ties` call it, and the Pallas kernel computes the same
    arithmetic per tile.

    Args:
      base: θ0 of the same shape, or ``None`` for λ·τ_m alone.
      slices: the T task-vector slices.
      thr: ``(T,)`` float32 thresholds.
      majority: the sign taken where the trimmed values cancel exactly (sum 0).
      scale: λ.
      merge: ``"mean"`` or ``"sum"``.
      out_dtype: the result's dtype (default: ``base``'s).
      mark: where true, such exact cancellations (sum 0, some value not 0) become NaN
        instead, so a plain sum of the output detects them (:func:`cljax.merging.ties`).

    Returns:
      ``θ0 + λ·τ_m`` (or ``λ·τ_m``) in ``out_dtype``, computed in the accumulation dtype.
    """
    kept = trim(slices, thr)
    total = ct.sum_slices(kept)
    gamma = jnp.sign(total)
    gamma = jnp.where(gamma == 0, jnp.asarray(majority).astype(gamma.dtype), gamma)
    num = jnp.zeros_like(total)
    cnt = jnp.zeros(total.shape, jnp.float32)
    for v in kept:
        agree = jnp.where(gamma > 0, v > 0, v < 0)
        num = num + jnp.where(agree, v, 0)
        cnt = cnt + agree
    merged = num / jnp.maximum(cnt, 1).astype(num.dtype) if merge == "mean" else num
    out_dtype = base.dtype if out_dtype is None and base is not None else out_dtype
    if base is None:
        value = jnp.asarray((scale * merged).astype(out_dtype))
    else:
        value = jnp.asarray(
            (base.astype(ct.accum_dtype(out_dtype)) + scale * merged).astype(out_dtype)
        )
    if mark is False:
        return value
    tie = (total == 0) & functools.reduce(jnp.logical_or, [v != 0 for v in kept])
    return jnp.where(mark & tie, jnp.array(jnp.nan, value.dtype), value)


# ----------------------------------------------------------------------------- kernels


def _sign(x):
    return jnp.where(x > 0, 1.0, jnp.where(x < 0, -1.0, 0.0))


def _elected_sum(tau_ref, p_ref, num_tasks):
    """The trimmed slices of one tile and the sum they vote with."""
    slices = []
    for t in range(num_tasks):
        x = tau_ref[t].astype(jnp.float32)
        slices.append(jnp.where(jnp.abs(x) >= p_ref[t], x, 0.0))
    total = slices[0]
    for v in slices[1:]:
        total = total + v
    return slices, total


def _vote_kernel(j, ins, shared, outs, part, *, num_tasks):
    del j, outs
    _, total = _elected_sum(ins[0], shared[0], num_tasks)
    slot = lax.broadcasted_iota(jnp.int32, (1, part.shape[-1]), 1)
    part[...] = jnp.where(slot == 0, block_sum(_sign(total)), 0.0)


def _merge_kernel(j, ins, shared, outs, part, *, num_tasks, merge, has_base):
    del j, part
    base_ref = ins[0] if has_base else None
    tau_ref, p_ref, out_ref = ins[-1], shared[0], outs[0]
    slices, total = _elected_sum(tau_ref, p_ref, num_tasks)
    majority, scale = p_ref[num_tasks], p_ref[num_tasks + 1]
    gamma = _sign(total)
    gamma = jnp.where(gamma == 0.0, majority, gamma)
    num = jnp.zeros(total.shape, jnp.float32)
    cnt = jnp.zeros(total.shape, jnp.float32)
    for v in slices:
        agree = jnp.where(gamma > 0.0, v > 0.0, v < 0.0)
        num = num + jnp.where(agree, v, 0.0)
        cnt = cnt + jnp.where(agree, 1.0, 0.0)
    merged = num / jnp.maximum(cnt, 1.0) if merge == "mean" else num
    out = scale * merged
    if base_ref is not None:
        out = base_ref[...].astype(jnp.float32) + out
    out_ref[...] = out.astype(out_ref.dtype)


def _params(thr, majority=0.0, scale=1.0):
    t = thr.shape[0]
    p = jnp.concatenate(
        [thr.astype(jnp.float32), jnp.stack([jnp.float32(majority), jnp.float32(scale)])]
    )
    return jnp.pad(p, (0, _dispatch.next_pow2(t + 2) - (t + 2)))


def _votes(tau: jax.Array, thr: jax.Array) -> jax.Array:
    return sign_votes([tau[t] for t in range(tau.shape[0])], thr)


def _merge(base, tau, thr, majority, scale, merge, out_dtype):
    slices = [tau[t] for t in range(tau.shape[0])]
    return disjoint_merge(base, slices, thr, majority, scale, merge=merge, out_dtype=out_dtype)


# ----------------------------------------------------------------------------- Pallas path


def _ties_pallas(base, taus, scale, k, merge, bs):
    num_tasks = taus[0].shape[0]
    tiled = Tiled(taus, bs, base=base)
    kk = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (num_tasks,))
    all_bf16 = all(t.dtype == jnp.bfloat16 for t in taus)
    thr = lax.bitcast_convert_type(radix_kth_bits(tiled, num_tasks, kk, all_bf16), jnp.float32)
    votes = jnp.int32(0)
    if tiled.chunks:
        kernel = functools.partial(_vote_kernel, num_tasks=num_tasks)
        votes = tiled.partial_sums(kernel, [_params(thr)], 128, "cljax_ties_vote")[0]
    if tiled.tau_small is not None:
        votes = votes + _votes(tiled.tau_small, thr)
    majority = jnp.sign(votes).astype(jnp.float32)
    out = [None] * len(taus)
    if tiled.small:
        y = _merge(tiled.base_small, tiled.tau_small, thr, majority, scale, merge, jnp.float32)
        ys = _dispatch.unpack(y, [base[j].shape for j in tiled.small])
        for j, v in zip(tiled.small, ys, strict=True):
            out[j] = v.astype(base[j].dtype)
    params = _params(thr, majority, scale)
    for c in tiled.chunks:
        tls = [tiled.tls[j] for j in c]
        kernel = functools.partial(_merge_kernel, num_tasks=num_tasks, merge=merge, has_base=True)
        ys, _ = _dispatch.multi_call(
            kernel,
            tls,
            [[tiled.base_tiles[j], tiled.tau_tiles[j]] for j in c],
            [params],
            bs,
            leaf_outputs=[[base[j].dtype] for j in c],
            name="cljax_ties_merge",
        )
        for j, y, tl in zip(c, ys, tls, strict=True):
            out[j] = _dispatch.from_tiles(y[0], tl, base[j].shape)
    return out


@functools.partial(jax.jit, static_argnames=("merge", "impl", "bs"))
def _ties_leaves(base, taus, scale, k, *, merge, impl, bs):
    if impl == "pallas":
        return _ties_pallas(base, taus, scale, k, merge, bs)
    thr = lax.bitcast_convert_type(ties_threshold(taus, k, implementation="xla"), jnp.float32)
    votes = sum(_votes(tau, thr).astype(jnp.float32) for tau in taus)
    majority = jnp.sign(votes)
    return [
        _merge(b, tau, thr, majority, scale, merge, b.dtype)
        for b, tau in zip(base, taus, strict=True)
    ]


def ties(
    base: ct.PyTree,
    task_vectors: Sequence[ct.PyTree] | ct.PyTree,
    *,
    density: float = 0.2,
    scale: ArrayLike = 1.0,
    merge: str = "mean",
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> ct.PyTree:
    """TIES-merging, global scope: θ0 + λ·disjoint_merge(elect(trim(τ))).

    Args:
      base: θ0, any pytree of arrays; every floating leaf is merged (integer leaves are
        returned unchanged and their task-vector entries ignored).
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees.
      density: fraction of each task vector's entries kept, in (0, 1] (the paper's 0.2).
      scale: λ, a Python number or a (traced) scalar.
      merge: ``"mean"`` (dis-mean, the paper's, λ ≈ 1) or ``"sum"`` (dis-sum, λ ≈ 0.3).
      implementation: ``None`` (Pallas on GPU/TPU, XLA on the CPU), ``"xla"`` or
        ``"pallas"`` (interpret mode on the CPU); selects the implementation of every pass
        (module docstring).
      block_sizes: Pallas tile sizes.

    Returns:
      The merged tree with θ0's structure and dtypes (float32 arithmetic).

    Raises:
      ValueError: for density outside (0, 1], an unknown merge or implementation,
        mismatched trees (first differing path named), or N beyond int32 counts.

    Example:
      >>> merged = ties(theta0, [tau_a, tau_b, tau_c], density=0.2, scale=1.0)

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
      NeurIPS 2023.
    """
    if not isinstance(density, int | float) or not 0.0 < density <= 1.0:
        raise ValueError(f"{density=} must be in (0, 1] (ties)")
    if merge not in _MERGES:
        raise ValueError(f"{merge=} must be one of {_MERGES} (ties)")
    impl = _dispatch.resolve(implementation, where="ties")
    bs = _dispatch.block_sizes_or_default(block_sizes)
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    ct.check_same_structure(base, tvs, names=("base", "task_vectors"), b_leading=(t,))
    leaves, treedef = jax.tree.flatten(base)
    tv_leaves = jax.tree.leaves(tvs)
    idx = [i for i, x in enumerate(leaves) if ct.is_float(x)]
    if not idx:
        return base
    n = sum(math.prod(leaves[i].shape) for i in idx)
    _check_count(n, "ties")
    merged = _ties_leaves(
        [jnp.asarray(leaves[i]) for i in idx],
        [jnp.asarray(tv_leaves[i]) for i in idx],
        jnp.asarray(scale, jnp.float32),
        jnp.int32(keep_count(density, n, scope="global")),
        merge=merge,
        impl=impl,
        bs=bs,
    )
    out = list(leaves)
    for i, m in zip(idx, merged, strict=True):
        out[i] = m
    return jax.tree.unflatten(treedef, out)
