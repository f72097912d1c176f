"""Exact k-th largest magnitude over many leaves without sorting (the TIES threshold).

TIES keeps, per task, the entries whose magnitude is at least the k-th largest magnitude of
the *whole* task vector (all leaves together). Sorting T×P values (P ≈ 10⁸–10¹⁰) or running a
per-leaf ``top_k`` is what makes global TIES infeasible at scale (MergeLM#37), so the
threshold is found by a search over the bit patterns of the magnitudes instead:

* For non-negative float32 values, the order of the values is the order of their bit
  patterns read as unsigned integers. The k-th largest magnitude is the largest bit pattern
  ``v`` with ``count(|x| >= v) >= k``: a search over the integers ``[0, 2³¹)``.
* Each pass reads every leaf once and counts, for every task, the magnitudes that reach
  each of **three** candidate patterns (:func:`count_at_least_many`). The count narrows a
  bracket ``[lo, hi)`` with ``count(lo) >= k > count(hi)``.
* How a pass counts, and why: XLA:CPU runs a reduction fed by a comparison on a slow
  generic path (several times a plain sum, and once more for each threshold of a pass),
  while an *elementwise* fusion with compares runs at memory speed. So each leaf is cut into
  ``16 × 32`` row slices, the per-slice indicators of the three candidates are packed into
  one uint32 (10 bits per candidate: a lane counts at most 512 entries) and added slice by
  slice, elementwise; only the packed ``(T, P / 512)`` remainder is reduced, after
  unpacking. Leaves too small for that and the ragged ends of the others are concatenated
  (padded with NaN, which counts as nothing) and counted the same way, or by plain sums
  when they hold fewer than 2¹⁶ entries a task (quicker to compile). A pass of three
  candidates is then bound by reading the inputs, as a task-arithmetic pass is.
* Candidates: the first three come from a strided sample of every leaf (about 2¹⁴ entries
  per task, sorted as int32 patterns): the sample quantile and 4 standard errors either
  side. Then *interpolation*: an inverse quadratic of the magnitude in log-count through
  the bracket's ends and the nearest counted point outside it, probed at rank ``k − ½``
  and ``_Z`` standard errors either side (a straight line missed by several standard
  errors across the first pass's wide bracket). Whenever the previous pass failed to
  halve the bracket, or few entries are left in it, the next splits it evenly in four (so
  the worst case stays below 64 passes). A bracket the sample left open at one end
  (extreme ranks) is searched geometrically from its known end.
* Listing: once every live bracket holds at most ``_listing_size(N)`` entries (about
  ``sqrt(N / 800)``), one pass lists them (:func:`bracket_entries`: per slot of the
  layout the largest of 16 row groups, then per column the largest and smallest of 32
  rows) and the k-th is read off the sorted list. Entries sharing a slot are missed; the
  number found tells, and such a task keeps counting. A typical search takes four passes
  (three counts, one listing), at ViT-B/32 shapes as on normal or Student-t entries at
  densities 0.001–0.9 (``tests/kernels/test_ties_threshold_xla.py`` bounds the count).
* When ``hi − lo == 1``, ``lo`` is the bit pattern of the k-th largest magnitude, exactly;
  every entry equal to it is at or above it (ties kept).

Subnormal magnitudes (below 1.2e-38) count as zero, as the hardware flushes them in compares.
Counts are exact (uint32, so N < 2³² entries per task). Magnitudes are compared in float32
(float64 leaves are rounded to float32 first). NaNs compare false: they are never counted,
so check inputs with ``check_finite=True`` where that matters.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cljax import tree as ct

__all__ = [
    "count_at_least",
    "count_at_least_many",
    "bracket_entries",
    "kth_largest_bits",
    "magnitude_bits",
]

_TOP = 0x80000000  # above every non-negative float32 pattern, NaNs included: count(_TOP) = 0
_MIN_NORMAL = 0x00800000
_MAX_PASSES = 66
_SAMPLE = 1 << 14
# Up to this many entries a task, the k-th is read off a sort of the int32 patterns: at
# this size a sort runs no slower than the search and compiles in a small fraction of its
# time (per-leaf TIES compiles one search per leaf shape).
_SORT_MAX = 1 << 14
_Z = 2.5
# Packed counting: a leaf's (T, n) entries become _GROUPS x _ROWS row slices of C columns;
# each candidate's 0/1 indicator takes _LANE_BITS bits of a uint32, so a lane's count,
# at most _GROUPS * _ROWS = 512, fits. Leaves with fewer than _MIN_COLUMNS columns are
# counted together with the others' ragged ends.
_CANDIDATES = 3
_LANE_BITS = 10
_GROUPS = 16
_ROWS = 32
_SPAN = _GROUPS * _ROWS
_MIN_COLUMNS = 64
_SMALL_TAIL = 1 << 16  # entries per task below which the rest is counted by plain sums
assert _SPAN < 1 << _LANE_BITS and _CANDIDATES * _LANE_BITS <= 32


def magnitude_bits(x: jax.Array) -> jax.Array:
    """The float32 bit pattern of ``|x|`` as uint32 (ordered like the magnitudes)."""
    return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def _entries(leaf: Any) -> int:
    """Entries per task of a stacked leaf or a tuple of T arrays, from the shapes (``x[0]``
    of a concrete stacked array would be an eager slice, a copy, on every call)."""
    return math.prod(leaf[0].shape if isinstance(leaf, tuple) else leaf.shape[1:])


def _prepare(leaves: Sequence[Any], k: Any, num_tasks: int | None):
    """Both searches' inputs: leaves (lists as tuples), T, entries per leaf and in all, k."""
    leaves = [tuple(x) if isinstance(x, list) else x for x in leaves]
    first = leaves[0]
    num_tasks = num_tasks or (len(first) if isinstance(first, tuple) else first.shape[0])
    sizes = [_entries(x) for x in leaves]
    n = sum(sizes)
    if n >= 1 << 32:
        raise ValueError(
            f"kth_largest_bits: {n=} entries per task; the exact counts need n < 2**32"
        )
    return leaves, num_tasks, sizes, n, jnp.asarray(k, jnp.uint32)


def _as_float(bits: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(bits, jnp.float32)


def _view(x: Any, dtype: Any, xp: Any) -> Any:
    """``x`` bit-cast to ``dtype`` (same width) with ``xp``: numpy on the host, else jax."""
    return x.view(dtype) if xp is np else lax.bitcast_convert_type(x, dtype)


def _magnitude_bits(x: Any, xp: Any) -> Any:
    """:func:`magnitude_bits` with ``xp`` (numpy on the host, else jax.numpy)."""
    return _view(xp.abs(x.astype(xp.float32)), xp.uint32, xp)


def count_at_least(x: jax.Array, threshold: jax.Array, *, batch_dims: int = 0) -> jax.Array:
    """Exact ``count(|x| >= threshold)`` over all but the first ``batch_dims`` axes.

    One threshold per batch entry, counted by :func:`count_at_least_many`.

    Args:
      x: a floating array.
      threshold: float32 magnitude(s), shaped like ``x.shape[:batch_dims]``.
      batch_dims: leading axes to keep (1 for a stacked ``(T, ...)`` leaf).

    Returns:
      uint32 counts of shape ``x.shape[:batch_dims]``.
    """
    batch = x.shape[:batch_dims]
    flat = x.reshape(math.prod(batch), -1)
    thr = jnp.reshape(jnp.asarray(threshold, jnp.float32), (1, flat.shape[0]))
    return count_at_least_many([flat], thr)[0].reshape(batch)


def _group_sums(flat: jax.Array, tests: Sequence[Any]) -> jax.Array:
    """``flat`` (T, 512·C) -> (T, 32, C) uint32: the tests' packed indicators summed over
    the 16 row groups (test j in bits [10j, 10j + 10); a lane is at most 16)."""
    num_tasks, n = flat.shape
    cols = n // _SPAN
    width = _ROWS * cols

    def packed(g):
        rows = flat[:, g * width : (g + 1) * width].reshape(num_tasks, _ROWS, cols)
        return ct.sum_slices(
            [test(rows).astype(jnp.uint32) << (_LANE_BITS * j) for j, test in enumerate(tests)],
            jnp.uint32,
        )

    return lax.optimization_barrier(ct.sum_slices([packed(g) for g in range(_GROUPS)], jnp.uint32))


def _layout(flats: Sequence[jax.Array]) -> tuple[list[jax.Array], jax.Array | None]:
    """Splits ``(T, n_i)`` arrays into the parts handled slice by slice (each ``(T, 512·C)``,
    ``C >= _MIN_COLUMNS``) and one tail: the small arrays and ragged ends, concatenated."""
    main, rest = [], []
    for flat in flats:
        cols = flat.shape[1] // _SPAN
        if cols >= _MIN_COLUMNS:
            main.append(flat[:, : _SPAN * cols])
            if _SPAN * cols < flat.shape[1]:
                rest.append(flat[:, _SPAN * cols :])
        else:
            rest.append(flat)
    if not rest:
        return main, None
    dtype = jnp.result_type(*rest)
    return main, jnp.concatenate([r.astype(dtype) for r in rest], axis=1)


def _pad_nan(tail: jax.Array) -> jax.Array:
    """The tail padded with NaN (which no test passes) to a multiple of 512 entries."""
    return jnp.pad(tail, ((0, 0), (0, -tail.shape[1] % _SPAN)), constant_values=jnp.nan)


def _count_flat(flats: Sequence[jax.Array], tests: Sequence[Any]) -> jax.Array:
    """How many entries pass each test, per task, over (T, n_i) arrays sharing the task
    axis; ``(len(tests), T)`` uint32. A test maps ``(T, rows, cols)`` entries (in their
    own floating dtype) to booleans and must be false for NaN (the padding)."""
    num_tasks = flats[0].shape[0]
    main, tail = _layout(flats)
    groups = [_group_sums(flat, tests) for flat in main]
    plain = jnp.zeros((len(tests), num_tasks), jnp.uint32)
    if tail is not None:
        if tail.shape[1] < _SMALL_TAIL:  # plain reductions: slower, but quick to compile
            plain = jnp.stack(
                [jnp.sum(test(tail[:, None]).astype(jnp.uint32), axis=(1, 2)) for test in tests]
            )
        else:
            groups.append(_group_sums(_pad_nan(tail), tests))
    if not groups:
        return plain
    # Per leaf, the row sums of its (materialised) group sums; then one unpacking for all.
    packed = [ct.sum_slices([p[:, r] for r in range(_ROWS)], jnp.uint32) for p in groups]
    packed = jnp.concatenate(packed, axis=1) if len(packed) > 1 else packed[0]
    mask = (1 << _LANE_BITS) - 1
    counts = [
        jnp.sum((packed >> (_LANE_BITS * j)) & mask, axis=1, dtype=jnp.uint32)
        for j in range(len(tests))
    ]
    return plain + jnp.stack(counts).reshape(len(tests), num_tasks)


def count_at_least_many(leaves: Sequence[Any], thresholds: jax.Array) -> jax.Array:
    """Exact ``count(|x| >= thresholds[j, t])`` over all leaves of each task, one read.

    Args:
      leaves: per leaf, either a stacked ``(T, *shape)`` array or a tuple/list of T arrays.
      thresholds: float32 magnitudes, ``(K, T)`` with ``K <= 3``.

    Returns:
      ``(K, T)`` uint32 counts (N < 2³² entries per task).
    """
    if thresholds.shape[0] > _CANDIDATES:
        raise ValueError(
            f"count_at_least_many: at most {_CANDIDATES} thresholds per task a pass, "
            f"got {thresholds.shape[0]}"
        )
    leaves = [tuple(x) if isinstance(x, list) else x for x in leaves]
    thresholds = thresholds.astype(jnp.float32)

    def tests(thr):  # magnitudes compared in float32
        return [lambda v, t=t: jnp.abs(v.astype(jnp.float32)) >= t[:, None, None] for t in thr]

    if not any(isinstance(x, tuple) for x in leaves):
        return _count_flat([x.reshape(x.shape[0], -1) for x in leaves], tests(thresholds))
    num_tasks = thresholds.shape[1]
    per_task = []
    for t in range(num_tasks):  # lists of per-task arrays: count task by task, no stacking
        flats = [x[t].reshape(1, -1) for x in leaves]
        per_task.append(_count_flat(flats, tests(thresholds[:, t : t + 1])))
    return jnp.concatenate(per_task, axis=1)


def _bracket_flat(flats: Sequence[jax.Array], lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Entries whose magnitude pattern lies in ``[lo_t, hi_t)``, one read of (T, n_i)
    arrays: ``(T, L)`` uint32 holding ``pattern - lo + 1`` at a position per found entry,
    0 elsewhere. Needs ``lo >= _MIN_NORMAL`` (patterns then order like the compares).

    Each leaf keeps, per (row, column) of its ``16 × 32`` slice layout, the largest entry of
    its 16 row groups (one elementwise pass, ``1/16`` written), then per column the largest
    and the smallest of its 32 rows: an entry is lost only where it shares a position with
    another, or a column with two others. The caller tells that by the number found."""
    lo_f = _as_float(lo)[:, None, None]
    top = jnp.minimum(hi - 1, jnp.uint32(0x7F800000))  # the largest pattern inside; NaN out
    top_f = _as_float(top)[:, None, None]

    def offsets(v):  # (T, rows, cols) -> uint32
        a = jnp.abs(v.astype(jnp.float32))
        inside = (a >= lo_f) & (a <= top_f)
        return jnp.where(inside, magnitude_bits(a) - lo[:, None, None] + 1, jnp.uint32(0))

    num_tasks = flats[0].shape[0]
    main, tail = _layout(flats)
    found = []
    if tail is not None:  # listed position by position when small, else like the leaves
        if tail.shape[1] < 8 * _SPAN:
            found.append(offsets(tail[:, None]).reshape(num_tasks, -1))
        else:
            main.append(_pad_nan(tail))
    for flat in main:
        cols = flat.shape[1] // _SPAN
        width = _ROWS * cols
        rows = [
            flat[:, g * width : (g + 1) * width].reshape(num_tasks, _ROWS, cols)
            for g in range(_GROUPS)
        ]
        best = lax.optimization_barrier(functools.reduce(jnp.maximum, [offsets(r) for r in rows]))
        per_row = [best[:, r] for r in range(_ROWS)]
        found.append(functools.reduce(jnp.maximum, per_row))
        many = ct.sum_slices([(x > 0).astype(jnp.uint32) for x in per_row], jnp.uint32)
        none = jnp.uint32(0xFFFFFFFF)
        least = functools.reduce(jnp.minimum, [jnp.where(x > 0, x, none) for x in per_row])
        found.append(jnp.where(many >= 2, least, jnp.uint32(0)))
    return jnp.concatenate(found, axis=1) if len(found) > 1 else found[0]


def _bracket_offsets(leaves: Sequence[Any], lo: jax.Array, hi: jax.Array) -> jax.Array:
    """:func:`_bracket_flat` of stacked leaves or tuples of T arrays (task by task)."""
    leaves = [tuple(x) if isinstance(x, list) else x for x in leaves]
    if not any(isinstance(x, tuple) for x in leaves):
        return _bracket_flat([x.reshape(x.shape[0], -1) for x in leaves], lo, hi)
    return jnp.concatenate(
        [
            _bracket_flat([x[t].reshape(1, -1) for x in leaves], lo[t : t + 1], hi[t : t + 1])
            for t in range(lo.shape[0])
        ]
    )


def bracket_entries(
    leaves: Sequence[Any], lo: jax.Array, hi: jax.Array, size: int
) -> tuple[jax.Array, jax.Array]:
    """The magnitudes of each task inside ``[lo_t, hi_t)`` (bit patterns), one read.

    Meant for narrow brackets holding a few entries: some may be missed where entries
    share a slot of the layout (see :func:`_bracket_flat`), so compare ``found`` with the
    bracket's count before trusting the list.

    Args:
      leaves: per leaf, a stacked ``(T, *shape)`` array or a tuple/list of T arrays.
      lo, hi: ``(T,)`` uint32 patterns, ``lo >= 0x00800000`` (normal magnitudes).
      size: the length of the returned lists.

    Returns:
      ``(patterns, found)``: ``(T, size)`` uint32 patterns of the entries found, in
      descending order, 0-padded (only the first ``size`` if more were found); and
      ``(T,)`` uint32, the number of entries found.
    """
    offs = _bracket_offsets(leaves, lo, hi)
    found = jnp.sum(offs > 0, axis=1, dtype=jnp.uint32)

    def first(row, count):  # the found entries of one task
        at = jnp.nonzero(row, size=size, fill_value=0)[0]
        return jnp.where(jnp.arange(size) < count, row[at], jnp.uint32(0))

    firsts = jnp.sort(jax.vmap(first)(offs, found), axis=1)[:, ::-1]
    patterns = jnp.where(firsts > 0, firsts + lo[:, None] - 1, jnp.uint32(0))
    return patterns, found


def _sample(leaf: Any, share: int) -> jax.Array:
    """About ``share`` strided entries of each task's slice of a leaf, ``(T, m)``."""
    per_task = leaf if isinstance(leaf, tuple) else [leaf[t] for t in range(leaf.shape[0])]
    stride = max(1, per_task[0].size // max(share, 1))
    return jnp.stack([jnp.abs(x.reshape(-1)[::stride].astype(jnp.float32)) for x in per_task])


def _count_rows(xp: Any, x: Any) -> Any:
    return xp.sum(x, axis=1, dtype=xp.uint32)


def _listing_size(n: int) -> int:
    """How many bracket entries a listing pass takes on for N entries a task: about
    ``sqrt(N / 800)`` (a power of two in [16, 512]), where two of them share a slot of
    the ``N / 16`` the listing keeps with probability near 1 %."""
    return 1 << min(9, max(4, round(math.log2(math.sqrt(n / 800) + 1))))


def _kth_by_sort(leaves: Sequence[Any], k: jax.Array, num_tasks: int) -> jax.Array:
    """The k-th largest pattern per task by sorting all ``(T, N)`` patterns (as int32)."""
    flats = [
        jnp.stack([v.reshape(-1) for v in x]) if isinstance(x, tuple) else x.reshape(num_tasks, -1)
        for x in leaves
    ]
    bits = jnp.concatenate([magnitude_bits(x) for x in flats], axis=1)
    bits = jnp.where(bits > jnp.uint32(0x7F800000), jnp.uint32(0), bits)  # NaN: never counted
    asc = jnp.sort(lax.bitcast_convert_type(bits, jnp.int32), axis=1)
    at = bits.shape[1] - jnp.clip(k, 1, bits.shape[1]).astype(jnp.int32)
    kth = lax.bitcast_convert_type(asc[:, at], jnp.uint32)
    # As for the search: below the smallest normal float32, compares flush to zero.
    return jnp.where(kth < _MIN_NORMAL, jnp.uint32(0), kth)


@overload
def kth_largest_bits(
    leaves: Sequence[Any],
    k: int | jax.Array,
    *,
    num_tasks: int | None = None,
    return_passes: Literal[False] = False,
    method: str | None = None,
) -> jax.Array: ...


@overload
def kth_largest_bits(
    leaves: Sequence[Any],
    k: int | jax.Array,
    *,
    num_tasks: int | None = None,
    return_passes: Literal[True],
    method: str | None = None,
) -> tuple[jax.Array, jax.Array]: ...


def kth_largest_bits(
    leaves: Sequence[Any],
    k: int | jax.Array,
    *,
    num_tasks: int | None = None,
    return_passes: bool = False,
    method: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Bit patterns of the k-th largest magnitude of each of T tasks, exactly.

    Args:
      leaves: per leaf, either a stacked ``(T, *shape)`` array or a tuple/list of T arrays;
        all leaves together form each task's vector of N entries.
      k: the rank to select, ``1 <= k <= N`` (may be traced).
      num_tasks: T (inferred from the first leaf if omitted).
      return_passes: also return the number of counting passes the search took (0 for
        a sort).
      method: ``"search"`` (the counting search), ``"sort"`` (a sort of every entry's
        pattern; NaNs sort as zeros, as they never count in the search), or ``None``:
        the sort for at most ``2**14`` entries a task, else the search.

    Returns:
      A ``(T,)`` uint32 array; ``lax.bitcast_convert_type(out, jnp.float32)`` is the value
      (and the number of passes with ``return_passes=True``).

    Raises:
      ValueError: if N ≥ 2³² (use per-leaf thresholds for such models).
    """
    leaves, num_tasks, sizes, n, k = _prepare(leaves, k, num_tasks)
    if method not in (None, "search", "sort"):
        raise ValueError(f"kth_largest_bits: {method=} must be None, 'search' or 'sort'")
    if method == "sort" or (method is None and n <= _SORT_MAX):
        lo = _kth_by_sort(leaves, k, num_tasks)
        return (lo, jnp.int32(0)) if return_passes else lo
    limit = _listing_size(n)
    sample = jnp.concatenate(
        [_sample(x, max(1, _SAMPLE * s // n)) for x, s in zip(leaves, sizes, strict=True)], axis=1
    )
    first_cands = _first_candidates(sample, k, n)
    search = _Search(k=k, n=n, limit=limit, first_cands=first_cands)

    def body(s):
        step = search.propose(s)
        # The barrier ties the leaves to this pass's candidates: otherwise XLA hoists their
        # magnitudes out of the loop, a full float32 copy of the task vectors.
        read, thr = lax.optimization_barrier((leaves, _as_float(step["cand"])))

        def listing(read, thr):
            del thr
            return search.after_listing(s, step, *bracket_entries(read, s["lo"], s["hi"], limit))

        def counting(read, thr):
            return search.after_counting(s, step, count_at_least_many(read, thr))

        return lax.cond(step["extract"], listing, counting, read, thr)

    final = lax.while_loop(_go_on, body, _initial_state(num_tasks, n))
    lo = _finish(final)
    return (lo, final["it"]) if return_passes else lo


def _first_candidates(sample: Any, k: Any, n: int, xp: Any = jnp) -> Any:
    """``(3, T)`` uint32: the first pass's candidates from a strided sample ``(T, m)`` of
    the magnitudes, its quantile at rank k and 4 standard errors either side."""
    num_tasks, m = sample.shape
    # Sorted as int32 patterns: XLA:CPU's float sort (a total order) is far slower.
    asc = xp.sort(_view(_magnitude_bits(sample, xp), xp.int32, xp), axis=1)
    q = k.astype(xp.float32) / n
    spread = 4.0 * xp.sqrt(m * q * (1 - q)) + 1.0
    rank = q * m
    tasks = xp.arange(num_tasks)

    def sample_bits(r):  # the pattern of descending sample rank r
        at = m - 1 - xp.clip(r, 0, m - 1).astype(xp.int32)
        return _view(asc[tasks, at], xp.uint32, xp)

    return xp.stack(  # ascending magnitudes: descending sample ranks
        [sample_bits(rank + spread), sample_bits(rank), sample_bits(rank - spread - 1) + 1]
    )


def _initial_state(num_tasks: int, n: int, xp: Any = jnp) -> dict:
    return {
        "it": xp.int32(0),
        "lo": xp.zeros((num_tasks,), xp.uint32),
        "hi": xp.full((num_tasks,), _TOP, xp.uint32),
        "c_lo": xp.full((num_tasks,), n, xp.uint32),
        "c_hi": xp.zeros((num_tasks,), xp.uint32),
        "bisect": xp.zeros((num_tasks,), bool),
        "listed": xp.int32(0),
        "out": xp.zeros((num_tasks,), xp.uint32),
        "c_out": xp.zeros((num_tasks,), xp.uint32),
    }


def _go_on(s: dict, xp: Any = jnp) -> Any:
    return (s["it"] < _MAX_PASSES) & xp.any(s["hi"] - s["lo"] > 1)


def _finish(final: dict, xp: Any = jnp) -> Any:
    # Compares flush subnormals to zero on CPUs and accelerators: below the smallest normal
    # float32 the k-th magnitude is reported as 0 (a threshold that keeps everything).
    return xp.where(final["lo"] < _MIN_NORMAL, xp.uint32(0), final["lo"])


class _Search(NamedTuple):
    """The search's bookkeeping on ``(T,)`` brackets, apart from the reads of the leaves:
    :meth:`propose` picks a pass (three candidates to count, or a listing of the
    bracket); :meth:`after_counting` and :meth:`after_listing` narrow the bracket with
    what that pass found. Inside one computation a ``while_loop`` runs them
    (:func:`kth_largest_bits`); :func:`kth_largest_bits_driven` runs the same steps from
    Python, reading the leaves through small per-leaf programs."""

    k: Any
    n: int
    limit: int
    first_cands: Any
    xp: Any = jnp  # jax.numpy inside a computation, numpy on the host

    def propose(self, s: dict) -> dict:
        xp = self.xp
        k = self.k
        lo, hi, c_lo, c_hi = s["lo"], s["hi"], s["c_lo"], s["c_hi"]
        width = hi - lo
        # Interpolation: probe where the count, read as a function of the magnitude,
        # reaches rank k - 1/2, and _Z standard errors either side. The function goes
        # through the bracket's ends and, when one was counted, the nearest point outside
        # it: an inverse quadratic (a straight line misses by several standard errors
        # across the first pass's wide bracket, where the density bends). When that failed
        # to halve the bracket, split it evenly instead.
        inside = (c_lo - c_hi).astype(xp.float32)
        frac = ((c_lo - k).astype(xp.float32) + 0.5) / inside
        spread = _Z * xp.sqrt(xp.maximum(frac * (1 - frac), 0.0) * inside) + 1.0
        c0, c1, c2 = (x.astype(xp.float32) for x in (c_lo, c_hi, s["c_out"]))
        v0, v1, v2 = (_view(x, xp.float32, xp) for x in (lo, hi, s["out"]))
        sides = xp.array([-1.0, 0.0, 1.0], xp.float32)[:, None]
        target = xp.clip(k.astype(xp.float32) - 0.5 - sides * spread, c1, c0)  # (3, T)
        line = v0 + (c0 - target) / (c0 - c1) * (v1 - v0)
        u, u0, u1, u2 = (xp.log(x + 0.5) for x in (target, c0, c1, c2))
        curve = (
            v0 * (u - u1) * (u - u2) / ((u0 - u1) * (u0 - u2))
            + v1 * (u - u0) * (u - u2) / ((u1 - u0) * (u1 - u2))
            + v2 * (u - u0) * (u - u1) / ((u2 - u0) * (u2 - u1))
        )
        has_out = (s["out"] != 0) & xp.isfinite(curve)
        at = xp.clip(xp.where(has_out, curve, line), v0, v1)
        interp = xp.clip(_magnitude_bits(at, xp), lo, hi)
        quarter = width // 4
        even = xp.stack([lo + quarter, lo + width // 2, hi - quarter])
        # After the first pass the ends are sample entries: with few entries left between
        # them (extreme ranks), probing next to both ends often closes the bracket at once.
        ends = xp.stack([lo + 1, lo + width // 2, hi - 1])
        even = xp.where(s["it"] == 1, ends, even)
        step = xp.where(s["bisect"] | (inside <= 2 * _CANDIDATES), even, interp)
        # A bracket still open at one end (the sample missed the extreme ranks) spans many
        # binades, where neither interpolation nor an even split of the patterns helps:
        # step geometrically away from the known end (x1.4 and x4 in magnitude) and probe
        # the middle of the patterns (which halves the bracket, bounding the passes).
        open_steps = (xp.uint32(1 << 22), xp.uint32(1 << 24))  # magnitude ratios sqrt(2), 4
        from_lo = xp.stack([lo + open_steps[0], lo + open_steps[1], lo + width // 2])
        from_hi = xp.stack(
            [lo + width // 2]
            + [xp.where(hi > d, hi - d, 1) for d in (open_steps[1], open_steps[0])]
        )
        step = xp.where(hi == xp.uint32(_TOP), from_lo, xp.where(lo == 0, from_hi, step))
        cand = xp.where(s["it"] == 0, self.first_cands, step)
        cand = xp.clip(cand, lo + 1, xp.maximum(hi - 1, lo + 1))
        live = width > 1
        inside = c_lo - c_hi
        # Few entries left in every live bracket: list them (one read) and take the k-th.
        # Entries sharing a slot of the listing's layout can be missed; a task whose list
        # falls short keeps its bracket, and counting goes on (a second listing waits
        # until fewer entries are left).
        room = xp.uint32(self.limit) >> (3 * s["listed"]).astype(xp.uint32)
        extract = (
            (s["it"] >= 1)
            & (s["listed"] < 2)
            & xp.all(~live | ((inside <= room) & (lo >= _MIN_NORMAL)))
        )
        return {"cand": cand, "extract": extract, "live": live, "inside": inside}

    def after_listing(self, s: dict, step: dict, patterns: Any, found: Any) -> dict:
        xp = self.xp
        k, limit = self.k, self.limit
        lo, hi, c_lo, c_hi = s["lo"], s["hi"], s["c_lo"], s["c_hi"]
        tasks = xp.arange(lo.shape[0])
        ok = step["live"] & (found == step["inside"])
        at = xp.clip(k - c_hi, 1, limit).astype(xp.int32) - 1  # rank in the bracket
        kth = patterns[tasks, at]
        return {
            "out": s["out"],
            "c_out": s["c_out"],
            "it": s["it"] + 1,
            "lo": xp.where(ok, kth, lo),
            "hi": xp.where(ok, kth + 1, hi),
            "c_lo": xp.where(ok, c_hi + _count_rows(xp, patterns >= kth[:, None]), c_lo),
            "c_hi": xp.where(ok, c_hi + _count_rows(xp, patterns > kth[:, None]), c_hi),
            "bisect": xp.zeros_like(s["bisect"]),
            "listed": s["listed"] + 1,
        }

    def after_counting(self, s: dict, step: dict, c: Any) -> dict:
        xp = self.xp
        k, n, cand, live = self.k, self.n, step["cand"], step["live"]
        lo, hi, c_lo, c_hi = s["lo"], s["hi"], s["c_lo"], s["c_hi"]
        width = hi - lo
        up = c >= k  # c: (K, T), non-increasing in cand
        new_lo = xp.max(xp.where(up, cand, lo), axis=0)
        new_hi = xp.min(xp.where(up, hi, cand), axis=0)
        # The counted point nearest the new bracket outside it (not the ends 0, _TOP).
        pts = xp.concatenate([lo[None], cand, hi[None]])
        cnt = xp.concatenate([c_lo[None], c, c_hi[None]])
        below = (pts < new_lo) & (pts > 0)
        top = xp.uint32(_TOP)
        above = (pts > new_hi) & (pts < top)
        b_pt = xp.max(xp.where(below, pts, 0), axis=0)
        b_cnt = xp.min(xp.where(below, cnt, n), axis=0)
        a_pt = xp.min(xp.where(above, pts, top), axis=0)
        a_cnt = xp.max(xp.where(above, cnt, 0), axis=0)
        new_c_lo = xp.min(xp.where(up, c, c_lo), axis=0)
        new_c_hi = xp.max(xp.where(up, c_hi, c), axis=0)
        use_b = (b_pt > 0) & ((a_pt == top) | (b_cnt - new_c_lo <= new_c_hi - a_cnt))
        out = xp.where(use_b, b_pt, xp.where(a_pt < top, a_pt, 0))
        return {
            "out": xp.where(live, out, s["out"]),
            "c_out": xp.where(live, xp.where(use_b, b_cnt, a_cnt), s["c_out"]),
            "it": s["it"] + 1,
            "lo": xp.where(live, new_lo, lo),
            "hi": xp.where(live, new_hi, hi),
            "c_lo": xp.where(live, new_c_lo, c_lo),
            "c_hi": xp.where(live, new_c_hi, c_hi),
            "bisect": (s["it"] >= 1) & (new_hi - new_lo > width // 2),
            "listed": s["listed"],
        }


# ------------------------------------------------------------------ the search from Python
#
# Inside one computation the search reads every leaf in a while loop, so the program holds
# counting and listing code for each leaf, and XLA:CPU compiles each leaf's fusions
# separately: the compile time grows with the number of leaves. Called outside a trace,
# the same steps run from Python instead: each read of the leaves is a call of a small
# program per leaf shape (a sample, a count, the bracket's offsets), and everything else
# runs in numpy on the host: the bookkeeping between passes (the same :class:`_Search`,
# on ``(T,)`` vectors), the first candidates (a sort of the sample) and the listing's
# compaction (the offsets a pass leaves hold ``N / 256`` entries a task). Only the three
# reads are compiled. One host synchronisation a pass decides the next.


@functools.partial(jax.jit, static_argnames=("share",))
def _sample_leaf(leaf: Any, *, share: int) -> jax.Array:
    return _sample(leaf, share)


@jax.jit
def _count_leaf(leaf: Any, thresholds: jax.Array) -> jax.Array:
    return count_at_least_many([leaf], thresholds)


@jax.jit
def _offsets_leaf(leaf: Any, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return _bracket_offsets([leaf], lo, hi)


def _host_listing(offsets: Sequence[np.ndarray], lo: np.ndarray, size: int):
    """:func:`bracket_entries` from the leaves' offsets, in numpy: the ``size`` largest
    patterns found per task, descending and 0-padded, and the number found. A task that
    found more than ``size`` holds more than any listed bracket: the check of ``found``
    against the bracket's count rejects its list."""
    offs = np.concatenate(offsets, axis=1) if len(offsets) > 1 else offsets[0]
    found = np.sum(offs > 0, axis=1, dtype=np.uint32)
    patterns = np.zeros((offs.shape[0], size), np.uint32)
    for t, row in enumerate(offs):
        top = np.sort(row[row > 0])[::-1][:size]
        patterns[t, : top.size] = top + lo[t] - np.uint32(1)
    return patterns, found


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def _sorted_kth(leaves, k, *, num_tasks):
    return _kth_by_sort(leaves, k, num_tasks)


# Leaves with fewer entries a task (biases, LayerNorm scales: most of a transformer's leaves)
# are read by the driven search as one array: each program call costs a fixed dispatch and
# launch, far more than such a leaf's bytes.
_PACK_BELOW = 1 << 14


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def _pack(leaves, *, num_tasks):
    """Small leaves as one ``(T, Σn)`` array (in their common dtype: magnitudes unchanged)."""
    flats = [
        jnp.stack([v.reshape(-1) for v in x]) if isinstance(x, tuple) else x.reshape(num_tasks, -1)
        for x in leaves
    ]
    dtype = jnp.result_type(*flats)
    return jnp.concatenate([x.astype(dtype) for x in flats], axis=1)


def _pack_small(leaves: list, sizes: list[int], num_tasks: int) -> list:
    small = [x for x, s in zip(leaves, sizes, strict=True) if s < _PACK_BELOW]
    if len(small) < 2:
        return leaves
    big = [x for x, s in zip(leaves, sizes, strict=True) if s >= _PACK_BELOW]
    return [*big, _pack(tuple(small), num_tasks=num_tasks)]


def kth_largest_bits_driven(
    leaves: Sequence[Any], k: int | jax.Array, *, num_tasks: int | None = None
) -> jax.Array:
    """:func:`kth_largest_bits` (``method=None``) run from Python, for concrete leaves.

    The same search and the same result, each read of the leaves a call of a program
    compiled once per leaf shape (a sample, a count, a listing's offsets), the bookkeeping
    in numpy on the host; far less to compile than the one computation of
    :func:`kth_largest_bits`, which holds code for every leaf and every step. Leaves under
    ``_PACK_BELOW`` entries a task are copied once into one array that every pass reads with
    one call. The sample (and so the candidates and the number of passes) may differ from
    the one computation's, and the host's float32 logarithm from XLA's in the last bit; the
    k-th is exact either way. Not for use under a trace (it reads the loop on the host).
    """
    leaves, num_tasks, sizes, n, k_dev = _prepare(leaves, k, num_tasks)
    if n <= _SORT_MAX:
        return _sorted_kth(leaves, k_dev, num_tasks=num_tasks)
    k_host = np.asarray(jax.device_get(k_dev), np.uint32)
    limit = _listing_size(n)
    leaves = _pack_small(leaves, sizes, num_tasks)
    sizes = [_entries(x) for x in leaves]
    samples = [
        _sample_leaf(x, share=max(1, _SAMPLE * s // n)) for x, s in zip(leaves, sizes, strict=True)
    ]
    sample = np.concatenate(jax.device_get(samples), axis=1)
    search = _Search(k_host, n, limit, _first_candidates(sample, k_host, n, np), np)
    s = _initial_state(num_tasks, n, np)
    # uint32 brackets wrap as they do in XLA; 0/0 and log(0) give the NaN/inf the
    # interpolation screens out with isfinite.
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        while _go_on(s, np):
            step = search.propose(s)
            if step["extract"]:
                lo, hi = (jnp.asarray(s[x]) for x in ("lo", "hi"))
                offsets = jax.device_get([_offsets_leaf(x, lo, hi) for x in leaves])
                patterns, found = _host_listing(offsets, s["lo"], limit)
                s = search.after_listing(s, step, patterns, found)
            else:
                thr = jnp.asarray(_view(step["cand"], np.float32, np))
                counts = jax.device_get([_count_leaf(x, thr) for x in leaves])
                c = functools.reduce(np.add, counts)
                s = search.after_counting(s, step, c)
        return jnp.asarray(_finish(s, np))
