"""Eager TIES on CPU arrays: the threshold found on the host, one chunk program.

A merge called on concrete arrays pays its compilation on every new model: XLA:CPU compiles
each program for the shapes it is given, so programs over whole leaves cost one compilation per
leaf shape (a ViT-B/32 holds 10), each a tenth of a second to a second. On the CPU the arrays
already live in host memory, where numpy reads them without a copy (``np.asarray`` of a CPU
array is a view of its buffer). So, when every input is a CPU array:

* The TIES threshold (the k-th largest magnitude per task) is found by numpy in one read of
  the task vectors (:func:`kth_bits`): a strided sample of the magnitudes brackets the k-th
  entry (its sample quantile, ``_Z`` standard errors either side); one pass counts the entries
  at or above each end and lists those strictly inside; the k-th is read off that list. The
  result is exact, as a full sort gives it; a bracket the sample missed, or one crowded by
  tied values, falls back to the counting search of :mod:`cljax.kernels._ties_threshold`.
* The merge runs as one program over fixed-length chunks
  of ``CHUNK`` entries of each leaf's per-task rows (:func:`windows`): the program is compiled
  once whatever the model's shapes. A row longer than a chunk is read in windows whose last one
  ends at the row's end (overlapping the one before: the overlap is computed twice, with the
  same values); a shorter row takes one zero-padded window, and rows under ``SHARED``
  entries share windows (the merge trims them on the host first).

The outputs are assembled in host memory and handed to JAX without a copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["CHUNK", "SHARED", "aligned_empty", "host_device", "kth_bits", "task_rows", "windows"]

#: Entries of a chunk program's input row: one compilation serves every leaf shape. A call
#: costs a fixed ~0.2 ms on XLA:CPU (its thread pool's hand-off), so windows are large.
CHUNK = 1 << 18
#: Rows under this many entries (and under ``CHUNK``) share windows with other leaves.
SHARED = 1 << 16
# Up to this many entries a task, the k-th is read off a partition of all of them.
_EXACT_MAX = 1 << 16
# Entries of the strided sample per task, and the half-width of the bracket it gives, in
# standard errors of the sample quantile.
_SAMPLE = 1 << 15
_Z = 5.0
# Entries numpy reads at a time: temporaries stay in the cache, and each numpy call's fixed
# cost is spread over many entries.
_BLOCK = 1 << 17
_MIN_NORMAL = 0x00800000
_TOP = 0x80000000  # above every magnitude pattern: nothing reaches it
_NAN = np.uint32(0x7FC00000)


def host_device(arrays: Iterable[Any]) -> jax.Device | None:
    """The CPU device that every array lives on, or ``None`` if one is traced, sharded or on
    another device (then the merge runs as JAX programs). numpy arrays and Python scalars
    count as host arrays when JAX's default backend is the CPU."""
    device = None
    for x in arrays:
        if isinstance(x, jax.core.Tracer):
            return None
        if isinstance(x, jax.Array):
            devices = x.devices()
            if len(devices) != 1:
                return None
            (d,) = devices
            if d.platform != "cpu" or (device is not None and d != device):
                return None
            device = d
        elif not isinstance(x, np.ndarray | np.generic | int | float):
            return None
    if device is None:
        if jax.default_backend() != "cpu":
            return None
        device = jax.devices()[0]
    return device


def task_rows(leaf: Any, num_tasks: int) -> list[np.ndarray]:
    """The T flat rows of a stacked ``(T, *shape)`` leaf or a tuple of T arrays, as numpy
    views of the arrays' buffers (no copy for CPU arrays)."""
    if isinstance(leaf, tuple):
        return [np.asarray(x).reshape(-1) for x in leaf]
    return list(np.asarray(leaf).reshape(num_tasks, -1))


def windows(n: int, size: int | None = None) -> list[int]:
    """Starts of the ``size``-entry windows (default ``CHUNK``) that cover a row of
    ``n >= size`` entries: every ``size`` entries, the last one ending at the row's end."""
    size = CHUNK if size is None else size
    starts = list(range(0, n - size + 1, size))
    if n % size:
        starts.append(n - size)
    return starts


def padded_window(rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Copies of rows shorter than ``CHUNK``, each zero-padded to one ``CHUNK``-entry window
    (so that a row between ``SHARED`` and ``CHUNK`` entries runs the window program)."""
    padded = [np.zeros(CHUNK, x.dtype) for x in rows]
    for buf, x in zip(padded, rows, strict=True):
        buf[: x.size] = x
    return padded


def aligned_empty(n: int, dtype: Any) -> np.ndarray:
    """An uninitialised 1-D array whose buffer starts on a 64-byte boundary (JAX then takes
    it without a copy)."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + n * dtype.itemsize].view(dtype)


def _magnitudes(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``|block|`` in float32 (wider dtypes rounded, as the XLA search compares)."""
    m = out[: block.size]
    if block.dtype == np.float32:
        return np.abs(block, out=m)
    m[...] = block
    return np.abs(m, out=m)


def _bits(x: Any) -> int:
    return int(np.asarray(x, np.float32).view(np.uint32))


def _float(bits: int) -> np.float32:
    return np.uint32(bits).view(np.float32)


def _flush(bits: int) -> int:
    # As the XLA search reports it: below the smallest normal float32, compares flush to 0.
    return 0 if bits < _MIN_NORMAL else bits


def _exact(leaf_rows: Sequence[Sequence[np.ndarray]], k: int) -> np.ndarray:
    """The k-th largest magnitude pattern of each task over a few entries, by one partition
    of a ``(T, n)`` array."""
    num_tasks = len(leaf_rows[0])
    mags = np.abs(
        np.stack(
            [
                np.concatenate([np.asarray(r[t], np.float32) for r in leaf_rows])
                for t in range(num_tasks)
            ]
        )
    )
    mags[np.isnan(mags)] = 0  # NaNs never count, as in the search
    at = mags.shape[1] - k
    bits = np.ascontiguousarray(np.partition(mags, at, axis=1)[:, at]).view(np.uint32)
    return np.where(bits < _MIN_NORMAL, np.uint32(0), bits)


def _sample(rows: Sequence[np.ndarray], n: int) -> np.ndarray:
    """About ``_SAMPLE`` strided magnitudes of one task's rows (NaN as 0)."""
    parts = []
    for r in rows:
        share = max(1, _SAMPLE * r.size // n)
        parts.append(np.abs(np.asarray(r[:: max(1, r.size // share)], np.float32)))
    mags = np.concatenate(parts)
    mags[np.isnan(mags)] = 0
    return mags


def _bracket(sample: np.ndarray, k: int, n: int) -> tuple[int, int]:
    """``[lo, hi)`` patterns that hold the k-th largest magnitude with high probability: the
    sample entries ``_Z`` standard errors either side of its quantile (``hi`` just above
    its entry, so that entries equal to either end lie inside)."""
    m = sample.size
    q = k / n
    rank = q * m
    spread = _Z * math.sqrt(m * q * (1 - q)) + 2
    top, bottom = math.floor(rank - spread), math.ceil(rank + spread)  # descending ranks
    at = [m - 1 - r for r in (top, bottom) if 0 <= r < m]  # ascending positions
    part = np.partition(sample, at) if at else sample
    hi = _bits(part[m - 1 - top]) + 1 if top >= 0 else _TOP
    lo = _bits(part[m - 1 - bottom]) if bottom < m else 0
    return lo, hi


def _count_at_least(rows: Sequence[np.ndarray], bits: int) -> int:
    """How many of a task's magnitudes reach the pattern ``bits`` (NaNs never do)."""
    at = _float(bits)
    buf = np.empty(_BLOCK, np.float32)
    return sum(
        int(np.count_nonzero(_magnitudes(row[s : s + _BLOCK], buf) >= at))
        for row in rows
        for s in range(0, row.size, _BLOCK)
    )


def _select(rows: Sequence[np.ndarray], k: int, lo: int, hi: int, cap: int) -> int | None:
    """One read of a task's rows: the k-th largest magnitude pattern if it lies in
    ``[lo, hi)`` and at most ``cap`` entries lie strictly inside, else ``None``.

    Per block, on the float32 patterns with the sign bit cleared, ``p``:
    ``d = p - (lo + 1)`` (unsigned, wrapping below ``lo + 1``) puts the bracket's inside at
    ``d < hi - (lo + 1)`` and every non-NaN pattern at or above ``lo + 1`` at
    ``d < 0x7F800001 - (lo + 1)``: two compares give the entries inside (listed by their
    ``d``) and, by difference, those at or above ``hi`` (NaN patterns lie above both)."""
    start = np.uint32(lo + 1)
    width = np.uint32(min(hi, 0x7F800001) - (lo + 1))
    finite = np.uint32(0x7F800001 - (lo + 1))
    d = np.empty(_BLOCK, np.uint32)
    flags = np.empty(_BLOCK, np.bool_)
    wide = None
    at_least = 0  # entries inside or at/above hi
    inside = []
    listed = 0
    for row in rows:
        if row.dtype != np.float32 and wide is None:
            wide = np.empty(_BLOCK, np.float32)
        for s in range(0, row.size, _BLOCK):
            block = row[s : s + _BLOCK]
            if row.dtype == np.float32:
                bits = block.view(np.uint32)
            else:  # rounded to float32, as the XLA search compares
                assert wide is not None
                bits = wide[: block.size]
                bits[...] = block
                bits = bits.view(np.uint32)
            dd, ff = d[: block.size], flags[: block.size]
            np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=dd)
            np.subtract(dd, start, out=dd)
            at_least += int(np.count_nonzero(np.less(dd, finite, out=ff)))
            found = np.flatnonzero(np.less(dd, width, out=ff))
            listed += found.size
            if listed > cap:
                return None
            if found.size:
                inside.append(dd[found])
    vals = np.concatenate(inside) if inside else np.empty(0, np.uint32)
    c_hi = at_least - vals.size
    if c_hi < k <= c_hi + vals.size:
        at = vals.size - (k - c_hi)
        return _flush(int(np.partition(vals, at)[at]) + lo + 1)
    if c_hi + vals.size < k <= _count_at_least(rows, lo):  # ties at lo: a second read
        return _flush(lo)
    return None


def kth_bits(leaf_rows: Sequence[Sequence[np.ndarray]], k: int) -> np.ndarray | None:
    """``(T,)`` uint32: the float32 pattern of the k-th largest ``|τ_t|`` over all leaves.

    Exactly the value of :func:`cljax.kernels._ties_threshold.ties_threshold` (a full
    sort's, with magnitudes below the smallest normal float32 reported as 0 and NaNs never
    counted), found on the host in one read of the task vectors.

    Args:
      leaf_rows: per leaf, its T flat rows (:func:`task_rows`).
      k: the rank, ``1 <= k <= N``.

    Returns:
      The patterns, or ``None`` where a task's sample bracket missed the k-th entry or held
      too many entries (tied values): the caller then runs the counting search.
    """
    num_tasks = len(leaf_rows[0])
    n = sum(r[0].size for r in leaf_rows)
    if n <= _EXACT_MAX:
        return _exact(leaf_rows, k)
    out = np.empty(num_tasks, np.uint32)
    for t in range(num_tasks):
        rows = [r[t] for r in leaf_rows]
        sample = _sample(rows, n)
        lo, hi = _bracket(sample, k, n)
        m = sample.size
        expected = n * (2 * _Z * math.sqrt(m * (k / n) * (1 - k / n)) + 4) / m
        bits = _select(rows, k, lo, hi, cap=int(4 * expected) + _BLOCK)
        if bits is None:
            return None
        out[t] = bits
    return out
