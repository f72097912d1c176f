"""``ties``: TIES-merging with a histogram-selected global threshold and a fused merge pass.

Semantics (those of ``cljax.merging.ties`` with ``scope="global"``, the paper's): for each task
t, keep the entries with ``|τ_t| >= v_t``, ``v_t`` the k-th largest magnitude of the whole task
vector (all leaves), ``k = int(density·N) + 1`` (the paper's code, :func:`keep_count`), ties
at ``v_t`` kept; elect
``γ = sign(Σ_t τ̂_t)``, zero sums taking the majority sign ``sign(Σ_p γ_p)`` over all entries;
merge the trimmed values that agree with γ (their mean, count clamped to 1, or their sum);
``θ = θ0 + λ·τ_m``.

Passes over the task vectors (T·N entries each; nothing of size T·N is written):

1. **High histogram.** For non-negative floats, the order of values is the order of their
   float32 bit patterns read as integers. One pass histograms the top 15 bits of the pattern
   of ``|τ_t|`` (32,768 bins per task, scatter-add, all leaves); a cumulative count from the
   top finds the bin holding the k-th largest and its rank inside the bin.
2. **Low histogram** of the 16 low bits of the entries in that bin (65,536 bins per task)
   gives the exact pattern: ``v_t`` equals the value a full sort would give. Skipped when
   every leaf is bfloat16, whose float32 patterns have zero low bits (1 pass instead of 2).
3. **Vote.** The global majority sign needs every coordinate's elected sign first: one pass
   sums ``sign(Σ_t τ̂_t)`` (a Pallas kernel writes per-block partial counts).
4. **Elect and merge**, fused: per tile, trim all T slices, elect, disjoint-merge, scale, add
   θ0, write once in θ0's dtype.

So 4 passes (3 for bfloat16) over the T task vectors plus one read of θ0 and one write of
θ in the XLA implementation. On a GPU the scatter-adds of passes 1–2 contend on the few bins
that hold most magnitudes (atomics serialise there, so the histogram runs slower than
``cljax.merging.ties``'s counting search), so the Pallas implementation replaces them by a
**radix select**: 3 bits a pass from the top of the pattern, each pass counting
``|τ_t| >= edge`` for the 7 edges of the next digit in one kernel (per-block partial counts,
summed in int32): 5 passes for bfloat16 task vectors, 11 for float32, then the vote and merge
kernels. Both give the value a full sort gives. Magnitudes are compared in float32 (float64 leaves are rounded); inputs must
be finite (a NaN has a pattern above +inf and would count as the largest magnitude).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from cljax import tree as ct
from cljax.kernels import _dispatch
from cljax.kernels._block_dots import _block_sum
from cljax.kernels._dispatch import BlockSizes

__all__ = ["kth_largest_magnitude", "ties"]

_MERGES = ("mean", "sum")
_HI_SHIFT = 16
_HI_BINS = 1 << 15  # bit 31 of |x| is 0: the top 15 bits
_LO_BINS = 1 << 16
_MAX_COUNT = 2**31 - 1


# ----------------------------------------------------------------------------- selection


def _magnitude_bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def _histogram(leaves, num_tasks: int, nbins: int, key_fn) -> jax.Array:
    """``[T, nbins]`` int32 counts of ``key_fn(bits) -> (bin, valid)`` over all leaves."""
    total = jnp.zeros((num_tasks * nbins,), jnp.int32)
    offsets = (jnp.arange(num_tasks, dtype=jnp.int32) * nbins)[:, None]
    for x in leaves:
        bits = _magnitude_bits(x).reshape(num_tasks, -1)
        key, valid = key_fn(bits)
        idx = key.astype(jnp.int32) + offsets
        if valid is not None:  # out of range: dropped by the scatter
            idx = jnp.where(valid, idx, num_tasks * nbins)
        total = total.at[idx.reshape(-1)].add(1, mode="drop")
    return total.reshape(num_tasks, nbins)


def _select(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The bin holding the k-th largest (per row) and the rank of that entry inside it.

    Two levels of 256-wide cumulative counts (a long ``cumsum`` lowers to a quadratic
    reduce-window on the CPU): the group of 256 bins, then the bin inside it.
    """
    t, nbins = hist.shape
    fine = hist.reshape(t, nbins // 256, 256)
    b_hi, k = _select_flat(jnp.sum(fine, axis=2), k)
    b_lo, k = _select_flat(jnp.take_along_axis(fine, b_hi[:, None, None], axis=1)[:, 0], k)
    return b_hi * 256 + b_lo, k


def _select_flat(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = hist.shape[1]  # <= 256: a small integer matmul, quicker to compile than a cumsum
    upper = (jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]).astype(jnp.int32)
    at_least = hist @ upper  # [t, b] = count of entries in bins >= b
    b = jnp.sum(at_least >= k[:, None], axis=1) - 1
    above = jnp.take_along_axis(at_least - hist, b[:, None], axis=1)[:, 0]
    return b, k - above


def _kth_bits(leaves: Sequence[jax.Array], k: jax.Array | int) -> jax.Array:
    """``[T]`` uint32 bit patterns of the k-th largest ``|τ_t|`` over stacked leaves.

    ``k`` may be traced (one compilation serves every density).
    """
    num_tasks = leaves[0].shape[0]
    kk = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (num_tasks,))
    hist = _histogram(leaves, num_tasks, _HI_BINS, lambda b: (b >> _HI_SHIFT, None))
    hi, kk = _select(hist, kk)
    hi = hi.astype(jnp.uint32)
    if all(x.dtype == jnp.bfloat16 for x in leaves):  # low 16 bits are all zero
        return hi << _HI_SHIFT
    hist = _histogram(
        leaves,
        num_tasks,
        _LO_BINS,
        lambda b: (b & (_LO_BINS - 1), (b >> _HI_SHIFT) == hi[:, None]),
    )
    lo, _ = _select(hist, kk)
    return (hi << _HI_SHIFT) | lo.astype(jnp.uint32)


_SCOPES = ("global", "leaf")


def keep_count(density: float, n: int, *, scope: str) -> int:
    """The rank of the TIES threshold: entries with ``|τ| >=`` the k-th largest magnitude
    of ``n`` are kept (all of them where magnitudes tie); 0 keeps nothing.

    The two references count differently, and each scope follows its own:

    * ``scope="global"`` (the TIES paper's code, ``topk_values_mask``): the threshold is
      the ``(n - int(n·density))``-th *smallest* magnitude, i.e. the
      ``(int(n·density) + 1)``-th largest, so ``int(n·density) + 1`` entries are kept
      (one more than ``density·n``; at least 1, the largest, when ``int(n·density) == 0``).
      At ``density == 1`` the reference asks for the 0-th smallest and fails; here every
      entry is kept (k = n).
    * ``scope="leaf"`` (mergekit's ``magnitude`` sparsification, per tensor): the
      ``int(density·n)`` largest are kept, so a leaf with ``int(density·n) == 0`` keeps
      nothing (mergekit stops there with an assertion); ``density >= 1`` keeps all.

    Args:
      density: the fraction kept, in (0, 1].
      n: the number of entries the threshold is taken over (all merged leaves for
        ``"global"``, one leaf for ``"leaf"``).
      scope: ``"global"`` or ``"leaf"``.

    Returns:
      k in ``[0, n]`` (``[1, n]`` for ``"global"`` with ``n >= 1``).

    Raises:
      ValueError: for an unknown scope, density outside (0, 1] or a negative n.

    Example:
      >>> keep_count(0.2, 10, scope="global"), keep_count(0.2, 10, scope="leaf")
      (3, 2)

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS
      2023 (github.com/prateeky2806/ties-merging, ``src/utils/merge_utils.py``,
      ``topk_values_mask``); Goddard et al., "Arcee's MergeKit", 2024
      (github.com/arcee-ai/mergekit, ``mergekit/sparsify.py``, ``magnitude``).
    """
    if scope not in _SCOPES:
        raise ValueError(f"keep_count: {scope=} must be one of {_SCOPES}")
    if not isinstance(density, int | float) or not 0.0 < density <= 1.0:
        raise ValueError(f"keep_count: {density=} must be in (0, 1]")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"keep_count: {n=} must be a non-negative int")
    n = int(n)
    m = int(n * density)  # Python floats, as both references compute it
    if scope == "global":
        return min(m + 1, n)
    return min(m, n)


def kth_largest_magnitude(task_vectors: Sequence[ct.PyTree] | ct.PyTree, k: int) -> jax.Array:
    """The k-th largest ``|τ_t|`` over all leaves of each task vector, without a sort.

    Two histogram passes over the float32 bit patterns of the magnitudes (one for bfloat16
    task vectors) give the exact value a full sort would (see the module docstring).

    Args:
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees; every
        floating leaf counts.
      k: the rank, ``1 <= k <= N`` (N entries per task vector).

    Returns:
      float32 ``[T]``.

    Raises:
      ValueError: if k is outside ``[1, N]`` or N does not fit the int32 counters.

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
    return _kth_jit(leaves, jnp.int32(k))


@jax.jit
def _kth_jit(leaves, k):
    return lax.bitcast_convert_type(_kth_bits(leaves, k), jnp.float32)


def _check_count(n: int, where: str) -> None:
    if n > _MAX_COUNT:
        raise ValueError(f"{where}: N={n} entries per task overflow the int32 histogram counts")


# ----------------------------------------------------------------------------- references


def _trimmed(x: jax.Array, thr: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.where(jnp.abs(x) >= thr, x, 0.0)


def _vote_xla(tau: jax.Array, thr: jax.Array) -> jax.Array:
    total = sum(_trimmed(tau[t], thr[t]) for t in range(tau.shape[0]))
    return jnp.sum(jnp.sign(total).astype(jnp.int32))


def _merge_xla(base, tau, thr, majority, scale, merge, out_dtype):
    slices = [_trimmed(tau[t], thr[t]) for t in range(tau.shape[0])]
    gamma = jnp.sign(sum(slices))
    gamma = jnp.where(gamma == 0, majority, gamma)
    num = jnp.zeros(gamma.shape, jnp.float32)
    cnt = jnp.zeros(gamma.shape, jnp.float32)
    for v in slices:
        agree = jnp.where(gamma > 0, v > 0, v < 0)
        num = num + jnp.where(agree, v, 0.0)
        cnt = cnt + agree
    merged = num / jnp.maximum(cnt, 1.0) if merge == "mean" else num
    acc = ct.accum_dtype(out_dtype)
    out = merged * scale if base is None else base.astype(acc) + scale * merged
    return out.astype(out_dtype)


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


def _count_kernel(j, ins, shared, outs, part, *, num_tasks, num_edges):
    """Per task t and edge e >= 1, the count of ``|τ_t| >= edge[t, e]`` in the tile."""
    del j, outs
    tau_ref, e_ref = ins[0], shared[0]
    slot = lax.broadcasted_iota(jnp.int32, (1, part.shape[-1]), 1)

    def task(t, res):  # a loop over tasks keeps the kernel's code small
        m = jnp.abs(tau_ref[t].astype(jnp.float32))
        for e in range(1, num_edges):
            n = _block_sum(jnp.where(m >= e_ref[t * num_edges + e], 1.0, 0.0))
            res = jnp.where(slot == t * num_edges + e, n, res)
        return res

    part[...] = lax.fori_loop(0, num_tasks, task, jnp.zeros((1, part.shape[-1]), jnp.float32))


def _vote_kernel(j, ins, shared, outs, part, *, num_tasks):
    del j, outs
    _, total = _elected_sum(ins[0], shared[0], num_tasks)
    slot = lax.broadcasted_iota(jnp.int32, (1, part.shape[-1]), 1)
    part[...] = jnp.where(slot == 0, _block_sum(_sign(total)), 0.0)


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


# ----------------------------------------------------------------------------- Pallas path


class _Tiled:
    """The task vectors' leaves split once: small ones packed for XLA, the others tiled."""

    def __init__(self, base, taus, bs):
        sizes = [math.prod(t.shape[1:]) for t in taus]
        self.small, self.chunks = _dispatch.split_leaves(sizes, bs)
        self.tls = {j: _dispatch.tiling(sizes[j], bs) for c in self.chunks for j in c}
        self.tau_tiles = {
            j: _dispatch.to_tiles(taus[j], tl, stacked=True) for j, tl in self.tls.items()
        }
        self.base_tiles = {j: _dispatch.to_tiles(base[j], tl) for j, tl in self.tls.items()}
        self.tau_small = None
        if self.small:
            self.tau_small = _dispatch.pack(
                [taus[j] for j in self.small], jnp.float32, stacked=True
            )
            self.base_small = _dispatch.pack([base[j] for j in self.small], jnp.float32)
        self.bs = bs

    def partial_sums(self, kernel, shared, width, name):
        """Σ over every tiled leaf's blocks of the kernel's per-block counts, in int32 (each
        block's count is an exact float32 integer; their total may pass 2**24)."""
        total = jnp.zeros((width,), jnp.int32)
        for c in self.chunks:
            tls = [self.tls[j] for j in c]
            _, parts = _dispatch.multi_call(
                kernel,
                tls,
                [[self.tau_tiles[j]] for j in c],
                shared,
                self.bs,
                partial_width=width,
                name=name,
            )
            total = total + jnp.sum(parts[:, 0, :].astype(jnp.int32), axis=0)
        return total


_RADIX_BITS = 3  # 7 edges a pass: compares stay cheaper than the bytes they read on a GPU


def _radix_kth_bits(tiled: _Tiled, num_tasks: int, k: jax.Array, all_bf16: bool) -> jax.Array:
    """``[T]`` bit patterns of the k-th largest ``|τ_t|``: a radix select, ``_RADIX_BITS``
    bits a pass from the top, counting ``|τ| >= edge`` for every edge of the digit at once.

    bfloat16 patterns (widened to float32) have 15 significant bits: 5 passes; float32 has
    31: 11 passes. Exact: after the last pass, ``prefix`` is the largest pattern with
    ``count(|τ| >= prefix) >= k``, the k-th largest magnitude.
    """
    low = _HI_SHIFT if all_bf16 else 0
    prefix = jnp.zeros((num_tasks,), jnp.uint32)
    top = 31
    while top > low:
        width = min(_RADIX_BITS, top - low)
        shift = top - width
        num_edges = 1 << width
        digits = jnp.arange(num_edges, dtype=jnp.uint32)
        edges = prefix[:, None] + (digits[None, :] << shift)  # [T, E] patterns
        e_f = lax.bitcast_convert_type(edges, jnp.float32).reshape(-1)
        slots = _dispatch.next_pow2(num_tasks * num_edges)
        counts = jnp.zeros((num_tasks * num_edges,), jnp.int32)
        if tiled.chunks:
            kernel = functools.partial(_count_kernel, num_tasks=num_tasks, num_edges=num_edges)
            shared = [jnp.pad(e_f, (0, slots - e_f.shape[0]))]
            counts = tiled.partial_sums(kernel, shared, slots, "cljax_ties_count")[: e_f.shape[0]]
        counts = counts.reshape(num_tasks, num_edges)
        if tiled.tau_small is not None:
            m = jnp.abs(tiled.tau_small)  # [T, n]
            e2 = e_f.reshape(num_tasks, num_edges)
            counts = counts + jnp.sum((m[:, None, :] >= e2[:, :, None]).astype(jnp.int32), axis=2)
        counts = counts.at[:, 0].set(_MAX_COUNT)  # count(|τ| >= prefix) >= k holds already
        digit = jnp.sum(counts >= k[:, None], axis=1) - 1
        prefix = prefix + (digit.astype(jnp.uint32) << shift)
        top = shift
    return prefix


def _ties_pallas(base, taus, scale, k, merge, bs):
    num_tasks = taus[0].shape[0]
    tiled = _Tiled(base, taus, bs)
    kk = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (num_tasks,))
    all_bf16 = all(t.dtype == jnp.bfloat16 for t in taus)
    thr = lax.bitcast_convert_type(_radix_kth_bits(tiled, num_tasks, kk, all_bf16), jnp.float32)
    votes = jnp.int32(0)
    if tiled.chunks:
        kernel = functools.partial(_vote_kernel, num_tasks=num_tasks)
        votes = tiled.partial_sums(kernel, [_params(thr)], 128, "cljax_ties_vote")[0]
    if tiled.tau_small is not None:
        votes = votes + _vote_xla(tiled.tau_small, thr)
    majority = jnp.sign(votes).astype(jnp.float32)
    out = [None] * len(taus)
    if tiled.small:
        y = _merge_xla(tiled.base_small, tiled.tau_small, thr, majority, scale, merge, jnp.float32)
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
    thr = lax.bitcast_convert_type(_kth_bits(taus, k), jnp.float32)
    votes = sum(_vote_xla(tau, thr).astype(jnp.float32) for tau in taus)
    majority = jnp.sign(votes)
    return [
        _merge_xla(b, tau, thr, majority, scale, merge, b.dtype)
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
        ``"pallas"`` (interpret mode on the CPU); selects passes 3–4 (module docstring).
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
