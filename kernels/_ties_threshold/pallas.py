"""The TIES threshold in Pallas: a radix select over the bit patterns of the magnitudes.

For non-negative floats the order of the values is the order of their float32 bit patterns
read as integers, so the k-th largest ``|τ_t|`` is the largest pattern ``v`` with
``count(|τ_t| >= v) >= k``. The select fixes that pattern ``_RADIX_BITS`` bits a pass from the
top: each pass counts ``|τ_t| >= edge`` for the ``2**_RADIX_BITS - 1`` edges of the next digit
of every task in one kernel (per-block partial counts, exact float32 integers, summed in
int32). bfloat16 task vectors (widened to float32) have 15 significant bits: 5 passes;
float32 has 31: 11 passes. After the last pass the prefix is the k-th largest magnitude,
exactly the value a full sort gives, ties included.

Why a radix select rather than the histograms or the counting search of the XLA
implementation: a histogram's scatter-adds contend on the few bins that hold most magnitudes
(atomics serialise there on a GPU), and the counting search's data-dependent candidates need a
host decision or a loop around whole-model reads; the radix select's passes are fixed, each one
kernel over the tiles with a handful of compares per entry, cheaper than the bytes it reads.

Leaves below ``BlockSizes.xla_below`` entries are packed into one array and counted by XLA in
the same pass (:class:`Tiled`). Magnitudes are compared in float32 (float64 leaves are rounded);
inputs must be finite (a NaN passes no compare and is never counted).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cljax.kernels import _dispatch
from cljax.kernels._block_dots.pallas import block_sum
from cljax.kernels._dispatch import BlockSizes

__all__ = ["MAX_COUNT", "Tiled", "kth_largest_bits", "radix_kth_bits"]

MAX_COUNT = 2**31 - 1  # the int32 counts: at most this many entries per task
_RADIX_BITS = 3  # 7 edges a pass: compares stay cheaper than the bytes they read on a GPU
_BF16_LOW_BITS = 16  # bfloat16 patterns widened to float32 end in 16 zero bits


class Tiled:
    """Stacked task-vector leaves laid out once for the kernels: leaves below
    ``bs.xla_below`` entries packed into one ``[T, n]`` float32 array for XLA, the others
    tiled ``[T, rows, lanes]`` and grouped into chunks of ``bs.leaves_per_call`` leaves.

    Args:
      taus: stacked leaves ``[T, *shape]``.
      bs: the block sizes.
      base: optionally θ0's leaves (unstacked, same order), tiled and packed alike (the
        merge kernel reads them; the threshold does not).
    """

    def __init__(self, taus: Sequence[jax.Array], bs: BlockSizes, base=None):
        sizes = [math.prod(t.shape[1:]) for t in taus]
        self.small, self.chunks = _dispatch.split_leaves(sizes, bs)
        self.tls = {j: _dispatch.tiling(sizes[j], bs) for c in self.chunks for j in c}
        self.tau_tiles = {
            j: _dispatch.to_tiles(taus[j], tl, stacked=True) for j, tl in self.tls.items()
        }
        self.tau_small = None
        if self.small:
            self.tau_small = _dispatch.pack(
                [taus[j] for j in self.small], jnp.float32, stacked=True
            )
        if base is not None:
            self.base_tiles = {j: _dispatch.to_tiles(base[j], tl) for j, tl in self.tls.items()}
            if self.small:
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


def _count_kernel(j, ins, shared, outs, part, *, num_tasks, num_edges):
    """Per task t and edge e >= 1, the count of ``|τ_t| >= edge[t, e]`` in the tile."""
    del j, outs
    tau_ref, e_ref = ins[0], shared[0]
    slot = lax.broadcasted_iota(jnp.int32, (1, part.shape[-1]), 1)

    def task(t, res):  # a loop over tasks keeps the kernel's code small
        m = jnp.abs(tau_ref[t].astype(jnp.float32))
        for e in range(1, num_edges):
            n = block_sum(jnp.where(m >= e_ref[t * num_edges + e], 1.0, 0.0))
            res = jnp.where(slot == t * num_edges + e, n, res)
        return res

    part[...] = lax.fori_loop(0, num_tasks, task, jnp.zeros((1, part.shape[-1]), jnp.float32))


def radix_kth_bits(tiled: Tiled, num_tasks: int, k: jax.Array, all_bf16: bool) -> jax.Array:
    """``[T]`` uint32 bit patterns of the k-th largest ``|τ_t|`` of the tiled leaves.

    Args:
      tiled: the task vectors' layout (shared with the merge kernels of
        :func:`cljax.kernels.ties`, which read the same tiles).
      num_tasks: T.
      k: ``[T]`` int32 ranks, ``1 <= k <= N`` (traced: one compilation serves every k).
      all_bf16: every leaf is bfloat16 (the low 16 bits need no passes).
    """
    low = _BF16_LOW_BITS if all_bf16 else 0
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
        counts = counts.at[:, 0].set(MAX_COUNT)  # count(|τ| >= prefix) >= k holds already
        digit = jnp.sum(counts >= k[:, None], axis=1) - 1
        prefix = prefix + (digit.astype(jnp.uint32) << shift)
        top = shift
    return prefix


@functools.partial(jax.jit, static_argnames=("bs",))
def kth_largest_bits(taus: Sequence[jax.Array], k: jax.Array, *, bs: BlockSizes) -> jax.Array:
    """:func:`radix_kth_bits` of stacked leaves ``[T, *shape]`` laid out with ``bs``."""
    num_tasks = taus[0].shape[0]
    kk = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (num_tasks,))
    all_bf16 = all(t.dtype == jnp.bfloat16 for t in taus)
    return radix_kth_bits(Tiled(taus, bs), num_tasks, kk, all_bf16)
