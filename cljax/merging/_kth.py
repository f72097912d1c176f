"""Exact k-th largest magnitude over many leaves without sorting (the TIES threshold).

TIES keeps, per task, the entries whose magnitude is at least the k-th largest magnitude of
the *whole* task vector (all leaves together). Sorting T×P values (P ≈ 10⁸–10¹⁰) or running a
per-leaf ``top_k`` is what makes global TIES infeasible at scale (MergeLM#37), so the
threshold is found by a search over the bit patterns of the magnitudes instead:

* For non-negative float32 values, the order of the values is the order of their bit
  patterns read as unsigned integers. The k-th largest magnitude is therefore the largest
  bit pattern ``v`` with ``count(bits(|x|) >= v) >= k``: a search over integers in
  ``[0, bits(+inf)]``.
* Each pass over the leaves counts, for every task at once, how many magnitudes reach each
  of ``B`` candidate patterns spread evenly over the current bracket ``[lo, hi)`` (invariant:
  ``count(lo) >= k > count(hi)``), and narrows the bracket to one of the ``B + 1`` pieces.
  A pass is a fused compare-and-count over every leaf (nothing of the size of the model is
  written), so it costs one read of the task vectors.
* The bracket starts at the ``2³¹`` patterns of ``[0, +inf]`` and shrinks by ``B + 1`` per
  pass; when ``hi - lo == 1``, ``lo`` is the bit pattern of the k-th largest magnitude,
  exactly (ties included: every entry equal to it is at or above it). With the default
  ``B = 15`` that is at most 8 passes, run in a ``lax.while_loop``.

Magnitudes are compared in float32 (float64 leaves are rounded to float32 first). NaNs have
bit patterns above +inf and count as the largest magnitudes; check inputs with
``check_finite=True`` where that matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["count_at_least", "kth_largest_bits", "magnitude_bits"]

_INF_BITS = 0x7F800000
_SEARCH_BITS = 31  # the bracket [0, +inf] holds fewer than 2**31 patterns


def magnitude_bits(x: jax.Array) -> jax.Array:
    """The float32 bit pattern of ``|x|`` as uint32 (ordered like the magnitudes)."""
    return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def count_at_least(x: jax.Array, candidates: jax.Array) -> jax.Array:
    """``[count(bits(|x|) >= c) for c in candidates]`` as uint32, in one pass over ``x``.

    The comparison is laid out as rows of ``x`` against all candidates so that XLA reads
    each row once and compares it to every candidate while it is in cache.
    """
    bits = magnitude_bits(x)
    rows = bits.reshape(-1, bits.shape[-1]) if bits.ndim >= 2 else bits.reshape(1, -1)
    hits = rows[:, None, :] >= candidates[None, :, None]
    per_row = jnp.sum(hits, axis=2, dtype=jnp.uint32)
    return jnp.sum(per_row, axis=0, dtype=jnp.uint32)


def num_passes(num_candidates: int) -> int:
    """Worst-case number of counting passes for ``num_candidates`` per pass."""
    return math.ceil(_SEARCH_BITS / math.log2(num_candidates + 1)) + 1


def kth_largest_bits(
    leaves: Sequence[Sequence[jax.Array]],
    k: int,
    *,
    num_candidates: int = 15,
) -> jax.Array:
    """Bit patterns of the k-th largest magnitude of each of T tasks, exactly.

    Args:
      leaves: per leaf, the T arrays of that leaf (one per task); all leaves together form
        each task's vector of N entries.
      k: the rank to select, ``1 <= k <= N`` (static).
      num_candidates: ``B``, the candidate thresholds counted per pass (static).

    Returns:
      A ``(T,)`` uint32 array; ``lax.bitcast_convert_type(out, jnp.float32)`` is the value.
    """
    num_tasks = len(leaves[0])
    b = num_candidates
    steps = jnp.arange(1, b + 1, dtype=jnp.uint32)

    def counts(cands):  # (T, B) uint32
        total = jnp.zeros((num_tasks, b), jnp.uint32)
        for per_task in leaves:
            total = total + jnp.stack([count_at_least(x, cands[t]) for t, x in enumerate(per_task)])
        return total

    def cond(state):
        it, lo, hi = state
        return (it < num_passes(b)) & jnp.any(hi - lo > 1)

    def body(state):
        it, lo, hi = state
        width = hi - lo
        q, r = width // (b + 1), width % (b + 1)
        # lo + floor(j * width / (B + 1)) without overflowing uint32.
        cands = lo[:, None] + q[:, None] * steps + (r[:, None] * steps) // (b + 1)
        ok = counts(cands) >= k  # a prefix of True: counts fall as candidates rise
        n_ok = jnp.sum(ok, axis=1)
        take = lambda j: jnp.take_along_axis(cands, jnp.clip(j, 0, b - 1)[:, None], 1)[:, 0]
        new_lo = jnp.where(n_ok > 0, take(n_ok - 1), lo)
        new_hi = jnp.where(n_ok < b, take(n_ok), hi)
        return it + 1, new_lo, new_hi

    lo = jnp.zeros((num_tasks,), jnp.uint32)
    hi = jnp.full((num_tasks,), _INF_BITS + 1, jnp.uint32)
    _, lo, _ = lax.while_loop(cond, body, (jnp.int32(0), lo, hi))
    return lo
