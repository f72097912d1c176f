"""Merging checkpoints larger than memory: stream tensor by tensor through safetensors files.

Peak memory is one tensor of each of the T+1 input files plus a few float32 temporaries of
that tensor's size, never T models, so models larger than memory merge. Task arithmetic and
weighted averages are one pass. Global TIES needs each task vector's magnitude threshold over
the whole model: the TIES threshold op's host implementation finds it exactly in two passes
(a histogram select on the float32 bit patterns of |τ|, :mod:`cljax.kernels._ties_threshold`),
then one pass for the global majority sign and one for the merge: four reads of the inputs and
one write, no sort.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cljax.kernels._ties_threshold import ties_threshold
from cljax.merging._common import keep_count
from cljax.safetensors import SafetensorsReader, SafetensorsWriter

__all__ = ["merge_safetensors"]

_METHODS = ("task_arithmetic", "average", "ties")


def merge_safetensors(
    pretrained: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "task_arithmetic",
    scale: float = 1.0,
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    merge: str = "mean",
    exclude: Sequence[str] = (),
) -> Path:
    """Merges fine-tuned safetensors checkpoints of one base model, streaming tensor by tensor.

    Args:
      pretrained: the base model's file.
      finetuned: T fine-tuned files with the same tensor names, shapes and dtypes.
      out: the merged file (written as ``out.part`` and renamed when complete).
      method: ``"task_arithmetic"`` (θ0 + scale·Σ_t τ_t), ``"average"`` (Σ_t w_t θ_t with
        weights normalised to sum 1; uniform by default) or ``"ties"`` (global TIES with
        ``density`` and ``merge`` in ``{"mean", "sum"}``, as :func:`cljax.merging.ties`).
      scale: λ for task arithmetic and TIES.
      weights: per-model weights for ``"average"``.
      density: fraction of each task vector TIES keeps, in (0, 1].
      merge: TIES disjoint merge, ``"mean"`` or ``"sum"``.
      exclude: regexes of tensor names that keep the pretrained value (integer tensors
        always do).

    Returns:
      The path of the merged file.

    Raises:
      ValueError: on an unknown method, bad hyperparameters, an empty model list, or files
        whose tensors differ (the message names the file and the tensor).
    """
    if method not in _METHODS:
        raise ValueError(f"{method=} must be one of {_METHODS}")
    if not finetuned:
        raise ValueError("finetuned is empty; need at least one checkpoint to merge")
    if method == "ties":
        if not 0.0 < density <= 1.0:
            raise ValueError(f"{density=} must be in (0, 1]")
        if merge not in ("mean", "sum"):
            raise ValueError(f"{merge=} must be 'mean' or 'sum'")
    T = len(finetuned)
    w = np.full(T, 1.0 / T)
    if method == "average":
        if weights is not None:
            w = np.asarray(weights, np.float64)
        if w.shape != (T,) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(
                f"weights={weights!r} must be {T} non-negative numbers with a positive sum"
            )
        w = w / w.sum()
    rx = [re.compile(p) for p in exclude]

    base = SafetensorsReader(pretrained)
    models = [SafetensorsReader(f) for f in finetuned]
    try:
        names = base.keys()
        for m in models:
            if set(m.keys()) != set(names):
                diff = sorted(set(m.keys()) ^ set(names))
                raise ValueError(
                    f"{m.path} and {base.path} hold different tensors, e.g. {diff[:5]}"
                )
            for n in names:
                if m.shape(n) != base.shape(n) or m.dtype(n) != base.dtype(n):
                    raise ValueError(
                        f"{m.path}: tensor {n!r} is {m.shape(n)} {m.dtype(n)}, base has {base.shape(n)} {base.dtype(n)}"
                    )
        merged_names = [
            n
            for n in names
            if np.issubdtype(base.dtype(n), np.floating) or base.dtype(n).kind == "V"
        ]
        merged_names = [n for n in merged_names if not any(r.search(n) for r in rx)]
        merged = set(merged_names)

        def deltas(n):
            b = base.get(n).astype(np.float32)
            return b, [m.get(n).astype(np.float32) - b for m in models]

        thresholds = majority = None
        if method == "ties":
            shapes = [base.shape(n) for n in merged_names]
            thresholds = _ties_thresholds(merged_names, deltas, T, density, shapes)
            majority = _ties_majority(merged_names, deltas, thresholds)

        writer = SafetensorsWriter(
            out, [(n, base.shape(n), base.dtype(n)) for n in names], base.metadata
        )
        for n in names:
            if n not in merged:
                writer.write(n, base.get(n))
                continue
            if method == "average":
                acc = np.zeros(base.shape(n), np.float32)
                for wt, m in zip(w, models, strict=True):
                    acc += np.float32(wt) * m.get(n).astype(np.float32)
                out_arr = acc
            elif method == "task_arithmetic":  # a running sum: three tensors in memory
                b = base.get(n).astype(np.float32)
                acc = np.zeros_like(b)
                for m in models:
                    acc += m.get(n).astype(np.float32)
                    acc -= b
                out_arr = b + np.float32(scale) * acc
            else:
                b, taus = deltas(n)
                out_arr = b + np.float32(scale) * _ties_merge(taus, thresholds, majority, merge)
            writer.write(n, out_arr.astype(base.dtype(n)))
        return writer.close()
    finally:
        base.close()
        for m in models:
            m.close()


class _TaskVectorLeaves:
    """The T task-vector arrays of each merged tensor, read from the files on access (one
    tensor in memory at a time)."""

    def __init__(self, names, deltas):
        self.names, self.deltas = names, deltas

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return self.deltas(self.names[i])[1]


def _ties_thresholds(names, deltas, T, density, shapes) -> np.ndarray:
    total = sum(math.prod(s) for s in shapes)
    if total == 0:
        return np.zeros(T, np.float32)
    rank = keep_count(density, total, scope="global")  # as cljax.merging.ties
    leaves = _TaskVectorLeaves(names, deltas)
    return ties_threshold(leaves, rank, num_tasks=T, implementation="numpy").view(np.float32)


def _trim(taus, thresholds):
    return [
        np.where(np.abs(tau) >= thr, tau, np.float32(0))
        for tau, thr in zip(taus, thresholds, strict=True)
    ]


def _ties_majority(names, deltas, thresholds) -> np.float32:
    total = 0
    for n in names:
        _, taus = deltas(n)
        total += int(np.sign(np.sum(_trim(taus, thresholds), axis=0)).sum())
    return np.float32(np.sign(total))


def _ties_merge(taus, thresholds, majority, merge) -> np.ndarray:
    # Elected sign: that of the sum of trimmed values, the majority sign where the sum is 0.
    # As in the reference code, an elected sign that is still 0 selects the negative values.
    trimmed = np.stack(_trim(taus, thresholds))
    sign = np.sign(trimmed.sum(axis=0))
    sign = np.where(sign == 0, majority, sign)
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    picked = np.where(agree, trimmed, np.float32(0)).sum(axis=0)
    if merge == "sum":
        return picked
    return picked / np.maximum(agree.sum(axis=0), 1).astype(np.float32)
