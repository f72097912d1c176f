"""The TIES threshold in numpy, on the host: a two-pass histogram select over the float32
bit patterns of the magnitudes, for task vectors that never reach a device.

The streaming merge (:func:`cljax.merging.merge_safetensors`) reads checkpoints larger than
memory tensor by tensor from files. Its threshold must be taken over every tensor of the
model, so each pass over the task vectors is a read of all T + 1 files: this select makes two
(the counting search of the XLA implementation makes four or five, the Pallas radix select
eleven), needs no transfer to a device and compiles nothing per tensor shape.

For non-negative floats the order of the values is the order of their bit patterns read as
unsigned integers. Pass 1 histograms the top 16 bits of every ``|τ_t|`` pattern (65,536 bins
per task) and finds, counting from the top, the bin holding the k-th largest and the rank of
that entry inside it; pass 2 histograms the low 16 bits of the entries in that bin, which
gives the exact pattern: the value a full sort gives, ties included. Magnitudes are taken in
float32 (wider dtypes are rounded); subnormals are counted as they are (numpy does not flush
them); inputs must be finite (a NaN's pattern lies above +inf and would count as the largest).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["kth_largest_bits"]

_BITS = 16
_BINS = 1 << _BITS


def _select(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest entry, and that entry's rank inside the bin."""
    above = np.cumsum(hist[::-1])  # above[i] = count in bins >= len-1-i
    i = int(np.searchsorted(above, rank))  # first reverse index where the count reaches rank
    before = int(above[i - 1]) if i > 0 else 0
    return len(hist) - 1 - i, rank - before


def _patterns(tau) -> np.ndarray:
    return np.abs(np.asarray(tau, np.float32)).view(np.uint32).ravel()


def kth_largest_bits(
    leaves: Iterable[Sequence[np.ndarray]], k: int, *, num_tasks: int
) -> np.ndarray:
    """``(T,)`` uint32 bit patterns of the k-th largest ``|τ_t|`` over all leaves.

    Args:
      leaves: per leaf, its T task-vector arrays (numpy); iterated twice, so a sequence
        whose items are read from files on access keeps one leaf in memory at a time.
      k: the rank, ``1 <= k <= N`` (N entries per task vector).
      num_tasks: T.

    Returns:
      uint32 ``(T,)``; ``out.view(np.float32)`` is the threshold.

    Raises:
      ValueError: if k exceeds N (found in the first pass).
    """
    hist = np.zeros((num_tasks, _BINS), np.int64)
    for taus in leaves:
        for t, tau in enumerate(taus):
            hist[t] += np.bincount(_patterns(tau) >> _BITS, minlength=_BINS)
    n = int(hist[0].sum())
    if k > n:
        raise ValueError(f"ties_threshold: {k=} must be in [1, N={n}]")
    picks = [_select(hist[t], k) for t in range(num_tasks)]
    hist = np.zeros((num_tasks, _BINS), np.int64)
    for taus in leaves:
        for t, tau in enumerate(taus):
            bits = _patterns(tau)
            inside = bits[(bits >> _BITS) == picks[t][0]]
            hist[t] += np.bincount(inside & (_BINS - 1), minlength=_BINS)
    out = np.empty(num_tasks, np.uint32)
    for t in range(num_tasks):
        low, _ = _select(hist[t], picks[t][1])
        out[t] = (picks[t][0] << _BITS) | low
    return out
