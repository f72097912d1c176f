"""The resumable step loop shared by the library's trainers.

The continual runner (:func:`cljax.continual.run_sequence`) and the aTLAS trainer
(:func:`cljax.merging.atlas.fit`) both run optimiser steps that a re-run with the same
checkpoint folder resumes, ending bit-identical to an uninterrupted run. What they share
lives here, once:

* :func:`check_every` validates ``checkpoint_every`` and its ``checkpoint_dir``;
* :func:`restore_latest` restores the newest good checkpoint (a damaged one is moved aside
  by :class:`cljax.checkpoint.CheckpointManager` and the previous one used) and refuses one
  written by another run, with the run's own explanation of why (:func:`other_run` writes
  the usual one: the metadata that identify a run differ);
* :func:`save` writes a checkpoint, never of a non-finite state, and moves aside a good
  checkpoint at the same step that the restore skipped (it is ahead of the resumed run);
* :func:`due` says whether a step count calls for a checkpoint inside a segment (a task,
  an epoch);
* :func:`floats_to_metadata` / :func:`floats_from_metadata` carry the per-step values of an
  unfinished segment (losses) through the JSON metadata without changing a bit.

Each trainer keeps its own loop body, its state layout and its metadata keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax.checkpoint import CheckpointManager
from cljax.train import NonFiniteError
from cljax.tree import path_str

__all__ = [
    "check_every",
    "due",
    "floats_from_metadata",
    "floats_to_metadata",
    "nonfinite_leaf",
    "other_run",
    "restore_latest",
    "save",
]


def check_every(
    checkpoint_every: Any, checkpoint_dir: str | os.PathLike | None, *, where: str = ""
) -> None:
    """Validates ``checkpoint_every``: ``None`` or a positive int, given with a folder.

    Args:
      checkpoint_every: the interval in steps, or ``None``.
      checkpoint_dir: the checkpoint folder, or ``None``.
      where: a prefix for the error (e.g. ``"fit: "``).

    Raises:
      ValueError: if ``checkpoint_every`` is not a positive int (a bool is not), or is
        given without ``checkpoint_dir``.
    """
    if checkpoint_every is None:
        return
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int | np.integer)
        or checkpoint_every < 1
    ):
        raise ValueError(f"{where}{checkpoint_every=} must be a positive int (steps) or None")
    if checkpoint_dir is None:
        raise ValueError(f"{where}{checkpoint_every=} needs a checkpoint_dir to write to")


def due(done: int, every: int | None, *, segment_end: bool) -> bool:
    """Whether to checkpoint after ``done`` steps inside a segment.

    A segment's last step is checkpointed by the segment's own save (a task or epoch
    boundary), so ``segment_end`` steps are never due here.

    Args:
      done: the steps counted so far (the step number the checkpoint is named by, or the
        steps of the whole run).
      every: the interval, or ``None`` for no checkpoints inside segments.
      segment_end: whether this step ends its segment.
    """
    return every is not None and not segment_end and done % every == 0


def other_run(
    identity: Mapping[str, Any], *, what: str, run: str = "run"
) -> Callable[[dict], str | None]:
    """The ``other_run`` of :func:`restore_latest` for a run identified by metadata values.

    Args:
      identity: the metadata keys and values that a checkpoint of this run carries (the
        number of tasks, the seed, the batch size, ...).
      what: the checkpoint named in the message (``"checkpoint in <folder>"``).
      run: what a run is called in the message (``"run"``, ``"fit"``).

    Returns:
      ``check(metadata)``: ``None`` if every key of ``identity`` has its value in
      ``metadata``, else ``"<what> is of another <run> ({saved}); this <run> has
      {identity} (use another folder)"`` with the saved values of those keys.
    """
    mine = dict(identity)

    def check(meta: dict) -> str | None:
        if all(meta.get(k) == v for k, v in mine.items()):
            return None
        saved = {k: meta.get(k) for k in mine}
        return f"{what} is of another {run} ({saved}); this {run} has {mine} (use another folder)"

    return check


def restore_latest(
    manager: CheckpointManager, target: Any, other_run: Callable[[dict], str | None]
) -> tuple[int, Any, dict] | None:
    """The newest good checkpoint of ``manager`` as ``(step, tree, metadata)``, or ``None``.

    A damaged checkpoint is moved aside with a warning and the previous one is used
    (:meth:`cljax.checkpoint.CheckpointManager.restore_latest`). ``other_run(metadata)``
    returns ``None`` for a checkpoint of this run, or the message explaining why it is not
    (another number of tasks, another seed): that message is raised. It is also raised when
    a checkpoint of another run does not even fit ``target``, where its metadata tells why
    better than the tree does.

    Raises:
      ValueError: with ``other_run``'s message, or the manager's when the tree does not fit
        and no checkpoint's metadata explains it.
    """
    try:
        restored = manager.restore_latest(target)
    except ValueError as e:
        for step in reversed(manager.steps()):
            try:
                problem = other_run(manager.verify(step).get("metadata", {}))
            except Exception:  # a damaged one: restore_latest's error says what it can
                continue
            if problem is not None:
                raise ValueError(problem) from e
        raise
    if restored is not None:
        problem = other_run(restored[2])
        if problem is not None:
            raise ValueError(problem)
    return restored


def nonfinite_leaf(tree: Any) -> str | None:
    """The path of the first floating leaf of ``tree`` holding NaN or Inf, or ``None``."""
    paths, checks = [], []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.inexact):
            paths.append(path_str(path))
            checks.append(jnp.all(jnp.isfinite(x)))
    for where, ok in zip(paths, jax.device_get(checks), strict=True):
        if not ok:
            return where
    return None


def save(manager: CheckpointManager, step: int, tree: Any, metadata: dict) -> None:
    """Saves ``tree`` as checkpoint ``step``, never a non-finite one.

    A checkpoint already at ``step`` is one the restore skipped: a damaged one is moved
    aside by the save itself; a good one is ahead of the resumed run and is moved aside
    here (:meth:`cljax.checkpoint.CheckpointManager.quarantine`), not lost.

    Raises:
      cljax.train.NonFiniteError: if a floating leaf of ``tree`` holds NaN or Inf (a resumed
        run would start from it as from a good one).
    """
    where = nonfinite_leaf(tree)
    if where is not None:
        raise NonFiniteError(
            f"refusing to checkpoint step {step} in {manager.directory}: leaf {where!r} "
            "holds NaN or Inf"
        )
    if manager.path(step).exists():
        try:
            manager.verify(step)
        except Exception:  # the save below moves it aside as damaged
            pass
        else:
            manager.quarantine(step, f"checkpoint {step} is ahead of the resumed run")
    manager.save(step, tree, metadata=metadata)


def floats_to_metadata(values: Sequence[Any]) -> tuple[list[float], str]:
    """Per-step scalars (device or host) as JSON numbers and their dtype's name.

    A float32 value survives the round trip through a Python float exactly, so
    :func:`floats_from_metadata` gives back the same bits.
    """
    host = [np.asarray(v) for v in jax.device_get(list(values))]
    return [float(v) for v in host], (str(host[0].dtype) if host else "float32")


def floats_from_metadata(values: Sequence[float], dtype: str) -> list[np.ndarray]:
    """The inverse of :func:`floats_to_metadata`."""
    return [np.asarray(v, dtype) for v in values]
