"""Data mixtures: piecewise-constant task weights over steps and deterministic mixed batches."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, cast

import numpy as np

from cljax._checks import check_int
from cljax.data._task import Task

if TYPE_CHECKING:
    import jax

__all__ = [
    "MixedBatcher",
    "MixtureSchedule",
    "mixed_batch_at",
    "mixed_batch_counts",
    "mixture_schedule",
]


def _check_weights(weights, where: str) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"{where}: weights must be a non-empty vector, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{where}: weights={w.tolist()} must be finite")
    if np.any(w < 0):
        raise ValueError(f"{where}: weights={w.tolist()} must be non-negative")
    if not w.sum() > 0:
        raise ValueError(f"{where}: weights={w.tolist()} must sum to more than 0")
    return w


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureSchedule:
    """Normalised task weights, constant between step boundaries (see :func:`mixture_schedule`).

    Attributes:
      boundaries: increasing start steps of the pieces; the first is 0.
      weights: ``[pieces, tasks]`` float64, each row summing to 1.
    """

    boundaries: tuple[int, ...]
    weights: np.ndarray

    @property
    def num_tasks(self) -> int:
        return self.weights.shape[1]

    def piece(self, step: int) -> int:
        """Index of the piece that holds ``step`` (steps before 0 belong to the first)."""
        return max(bisect.bisect_right(self.boundaries, int(step)) - 1, 0)

    def __call__(self, step) -> np.ndarray | jax.Array:
        """The weight vector at ``step`` (an int, or a traced integer inside ``jit``)."""
        if isinstance(step, int | np.integer):
            return self.weights[self.piece(int(step))].copy()
        import jax.numpy as jnp

        idx = jnp.searchsorted(jnp.asarray(self.boundaries), step, side="right") - 1
        return jnp.asarray(self.weights, jnp.float32)[jnp.maximum(idx, 0)]


def mixture_schedule(
    boundaries_and_weights: Mapping[int, Sequence[float]] | Sequence[tuple[int, Sequence[float]]],
) -> MixtureSchedule:
    """Task weights that change at given steps, like ``optax.piecewise_constant_schedule``.

    ``{0: [3, 1], 1000: [1, 1]}`` mixes two tasks 3:1 for steps 0-999 and 1:1 from step 1000
    on. Weights are normalised to sum to 1; a task with weight 0 is not drawn.

    Args:
      boundaries_and_weights: a mapping or a sequence of ``(start_step, weights)`` pairs; the
        steps must be distinct non-negative ints and one of them 0; every weight vector has the
        same length (one entry per task) and is non-negative, finite and sums to more than 0.

    Returns:
      A :class:`MixtureSchedule`: ``schedule(step) -> weights`` (numpy for an int step, a
      float32 ``jax.Array`` for a traced one), with its pieces as attributes.

    Raises:
      ValueError: on an empty schedule, a missing step 0, repeated or negative steps, weight
        vectors of different lengths, or weights that are negative, non-finite or all zero.

    Example::

      schedule = mixture_schedule({0: [1.0, 0.0], 500: [0.5, 0.5]})
      schedule(600)  # array([0.5, 0.5])
    """
    items = list(
        boundaries_and_weights.items()
        if isinstance(boundaries_and_weights, Mapping)
        else boundaries_and_weights
    )
    if not items:
        raise ValueError("mixture_schedule: boundaries_and_weights is empty")
    steps = [s for s, _ in items]
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0:
            raise ValueError(f"mixture_schedule: boundary step={s!r} must be a non-negative int")
    if len(set(steps)) != len(steps):
        raise ValueError(f"mixture_schedule: boundary steps={steps} repeat")
    if 0 not in steps:
        raise ValueError(f"mixture_schedule: boundary steps={steps} must include 0")
    order = sorted(range(len(items)), key=lambda i: steps[i])
    rows = [_check_weights(items[i][1], f"mixture_schedule at step {steps[i]}") for i in order]
    if len({r.size for r in rows}) != 1:
        sizes = [r.size for r in rows]
        raise ValueError(f"mixture_schedule: weight vectors have different lengths {sizes}")
    w = np.stack([r / r.sum() for r in rows])
    w.setflags(write=False)
    return MixtureSchedule(tuple(int(steps[i]) for i in order), w)


def mixed_batch_counts(
    weights: Sequence[float] | np.ndarray | jax.Array, batch_size: int
) -> np.ndarray:
    """Examples per task in a batch: largest-remainder (Hamilton) rounding of the quotas.

    Each task gets ``floor(w_i / sum(w) * batch_size)`` examples; the seats left over go one
    each to the tasks with the largest fractional parts, ties to the lower index. Quotas are
    computed exactly (rational arithmetic on the float weights), so ties are real ties and the
    result is the same on every machine.

    Args:
      weights: non-negative, finite weights, one per task, summing to more than 0.
      batch_size: a positive int.

    Returns:
      ``int64 [tasks]`` counts summing to ``batch_size``; a task of weight 0 gets 0.

    Raises:
      ValueError: on bad weights or a non-positive ``batch_size``.

    Example::

      mixed_batch_counts([1, 1, 1], 8)  # array([3, 3, 2])
    """
    batch_size = check_int(batch_size, name="batch_size", where="mixed_batch_counts", low=1)
    w = _check_weights(weights, "mixed_batch_counts")
    exact = [Fraction(float(x)) for x in w]
    total = sum(exact)
    quotas = [x * int(batch_size) / total for x in exact]
    counts = [math.floor(q) for q in quotas]
    left = int(batch_size) - sum(counts)
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return np.asarray(counts, np.int64)


@functools.lru_cache(maxsize=256)
def _epoch_permutation(n: int, seed: int, task: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch`` of a task's stream (cached: consecutive batches read the same epoch)."""
    perm = np.random.default_rng([seed, task, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


def _stream_indices(n: int, start: int, count: int, seed: int, task: int) -> np.ndarray:
    """Positions ``[start, start + count)`` of a task's endless stream of shuffled epochs."""
    out = []
    pos, end = start, start + count
    while pos < end:
        epoch, i = divmod(pos, n)
        take = min(end - pos, n - i)
        perm = _epoch_permutation(n, seed, task, epoch)
        out.append(perm[i : i + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class MixedBatcher:
    """Batches drawn from several tasks in the proportions of a schedule, by random access.

    Each task is read as an endless stream of shuffled epochs (epoch ``e`` of task ``t`` is the
    permutation drawn from ``default_rng([seed, t, e])``), and the batch of step ``s`` takes
    from each task the next ``counts_at(s)[t]`` examples of its stream. Where a task's stream
    stands at step ``s`` is a sum over the schedule's pieces, so ``batch_at(s)`` costs the
    same at any step and a resumed run sees exactly the batches it would have seen: the data
    position is part of the step counter, as in :meth:`Task.batch_at`.

    Attributes:
      tasks: the tasks mixed (inputs of one shape and dtype).
      batch_size: examples per batch.
      schedule: a :class:`MixtureSchedule` or a fixed weight vector (one entry per task).
      seed: the data seed.
      split: the split drawn from (``"train"``).

    Example::

      batcher = MixedBatcher((task_a, task_b), 64, mixture_schedule({0: [3, 1]}), seed=0)
      batch = batcher.batch_at(step)  # {"x", "y", "task"}

    Raises:
      ValueError: (at construction) without tasks, with a ``batch_size`` that is not a
        positive int or a ``seed`` that is not a non-negative int, with a schedule whose
        length differs from the number of tasks, with a task of positive weight that the
        rounding leaves without a single example per batch (its quota ``w * batch_size``
        ranks below the others' remainders: it would silently never be drawn), with inputs of different shapes or dtypes, or with an empty
        split in a task the schedule ever draws from.
    """

    tasks: tuple[Task, ...]
    batch_size: int
    schedule: MixtureSchedule
    seed: int = 0
    split: str = "train"

    def __post_init__(self):
        tasks = tuple(self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if not tasks:
            raise ValueError("MixedBatcher: no tasks")
        if not isinstance(self.schedule, MixtureSchedule):
            object.__setattr__(self, "schedule", mixture_schedule({0: self.schedule}))
        if self.schedule.num_tasks != len(tasks):
            raise ValueError(
                f"MixedBatcher: the schedule weighs {self.schedule.num_tasks} tasks but "
                f"{len(tasks)} tasks were given"
            )
        check_int(self.batch_size, name="batch_size", where="MixedBatcher", low=1)
        check_int(self.seed, name="seed", where="MixedBatcher", low=0)
        for k, w in enumerate(self.schedule.weights):
            starved = (w > 0) & (mixed_batch_counts(w, self.batch_size) == 0)
            if starved.any():
                t = int(np.argmax(starved))
                raise ValueError(
                    f"MixedBatcher: task {tasks[t].name!r} has weight {w[t]:.4g} from step "
                    f"{self.schedule.boundaries[k]} but gets 0 of batch_size={self.batch_size} "
                    f"examples in every batch (largest-remainder rounding); use a batch_size of "
                    f"at least {math.ceil(1 / w[t] - 1e-9)} or a larger weight"
                )
        first = tasks[0].split(self.split)[0]
        used = self.schedule.weights.max(axis=0) > 0
        for t, task in enumerate(tasks):
            x, _ = task.split(self.split)
            if x.shape[1:] != first.shape[1:] or x.dtype != first.dtype:
                raise ValueError(
                    f"MixedBatcher: task {task.name!r} has inputs {x.shape[1:]} {x.dtype} but "
                    f"task {tasks[0].name!r} has {first.shape[1:]} {first.dtype}"
                )
            if used[t] and len(x) == 0:
                raise ValueError(f"MixedBatcher: task {task.name!r} has no {self.split} examples")

    def counts_at(self, step: int) -> np.ndarray:
        """Examples per task in the batch of ``step``."""
        return mixed_batch_counts(self.schedule(int(step)), self.batch_size)

    def _offsets(self, step: int) -> np.ndarray:
        """How many examples of each task the steps ``0 .. step - 1`` have consumed."""
        sched, step = self.schedule, int(step)
        off = np.zeros(len(self.tasks), np.int64)
        for k, start in enumerate(sched.boundaries):
            if start >= step:
                break
            stop = sched.boundaries[k + 1] if k + 1 < len(sched.boundaries) else step
            n_steps = min(stop, step) - start
            off += n_steps * mixed_batch_counts(sched.weights[k], self.batch_size)
        return off

    def batch_at(self, step: int) -> dict:
        """The batch of global step ``step`` (``step >= 0``): ``{"x", "y", "task"}``.

        Examples are grouped by task in task order; ``task`` holds each example's task index.
        """
        step = check_int(step, name="step", where="MixedBatcher.batch_at", low=0)
        counts, offsets = self.counts_at(step), self._offsets(step)
        xs, ys, ids = [], [], []
        for t, (task, c, o) in enumerate(zip(self.tasks, counts, offsets, strict=True)):
            if c == 0:
                continue
            x, y = task.split(self.split)
            idx = _stream_indices(len(y), int(o), int(c), self.seed, t)
            xs.append(x[idx])
            ys.append(y[idx])
            ids.append(np.full(int(c), t, np.int32))
        return {"x": np.concatenate(xs), "y": np.concatenate(ys), "task": np.concatenate(ids)}

    def batches(self, *, start: int = 0, steps: int | None = None) -> Iterator[dict]:
        """Yields the batches of steps ``start, start + 1, ...`` (``steps`` of them, or endless)."""
        s = start
        while steps is None or s < start + steps:
            yield self.batch_at(s)
            s += 1


def mixed_batch_at(
    tasks: Sequence[Task],
    step: int,
    batch_size: int,
    schedule: MixtureSchedule | Sequence[float],
    seed: int = 0,
    *,
    split: str = "train",
) -> dict:
    """The batch of ``step`` of a :class:`MixedBatcher` over ``tasks`` (see there).

    Args:
      tasks: the tasks mixed.
      step: the global step (``>= 0``).
      batch_size: examples per batch.
      schedule: a :class:`MixtureSchedule` (from :func:`mixture_schedule`) or fixed weights.
      seed: the data seed.
      split: the split drawn from.

    Returns:
      ``{"x", "y", "task"}``: ``batch_size`` examples grouped by task, with their task indices.

    Raises:
      ValueError: as :class:`MixedBatcher`, or on a negative step.

    Example::

      batch = mixed_batch_at(tasks, step, 64, mixture_schedule({0: [1, 1], 1000: [1, 3]}))
    """
    # MixedBatcher turns fixed weights into a one-piece schedule in __post_init__.
    schedule = cast(MixtureSchedule, schedule)
    return MixedBatcher(tuple(tasks), batch_size, schedule, seed, split).batch_at(step)
