"""The task-sequence runner: train tasks one after another, evaluate all of them after each.

A run is a loop over tasks ``j = 0..T-1``::

    begin_task hooks -> steps_per_task jitted train steps -> end_task hooks
    -> evaluate every task i -> A[j, i] -> checkpoint (state, A) at the boundary

With ``checkpoint_every=N`` the whole state is also saved every N optimiser steps inside a
task (in ``<checkpoint_dir>/mid_task``), and a re-run resumes at that step: the result is
bit-identical to an uninterrupted run.

Methods are NamedTuples of pure hooks (:class:`Method`, built by factories such as
:func:`cljax.continual.ewc`): they may wrap the optimiser (a projection transform after it),
add a loss term, keep a state in ``TrainState.methods`` and change the train state between
tasks. The runner owns the scenario -- how the local labels of a task map onto the model's
outputs -- through a :class:`HeadLayout`:

* ``"task"`` (task-incremental): one head per task, i.e. a slice of the output per task;
  training and evaluation use the task's slice only (the task id is known);
* ``"class"`` (class-incremental): one growing head; task ``i`` trains over the classes
  seen so far (``class_loss="seen"``) or over its own new classes only (``"new"``, the
  local cross-entropy of PyCIL's baselines and of CoSO's and InfLoRA's class-incremental
  code), and evaluation after task ``j`` takes the argmax over the classes of tasks
  ``0..j`` (no task id);
* ``"domain"`` (domain-incremental): every task has the same label space and one head.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _loop
from cljax._loop import nonfinite_leaf as _nonfinite_leaf
from cljax.checkpoint import CheckpointManager
from cljax.continual._metrics import summarize
from cljax.data import Task
from cljax.projection._common import find_state
from cljax.stateful import EmptyState
from cljax.train import NonFiniteError, TrainState
from cljax.train._state import commit_arrays

__all__ = [
    "ContinualResult",
    "HeadLayout",
    "Method",
    "TaskContext",
    "cross_entropy_loss",
    "run_sequence",
]

SCENARIOS = ("task", "class", "domain")
CLASS_LOSSES = ("seen", "new")
NONFINITE = ("raise", "skip")
_NEG = -1e9


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """How each task's local labels map onto the model's outputs.

    Attributes:
      scenario: ``"task"``, ``"class"`` or ``"domain"``.
      offsets: first output of each task.
      sizes: number of classes of each task.
      num_outputs: width of the model's output.
      class_loss: ``"class"`` scenario only: the outputs task ``i`` trains over, ``"seen"``
        (the classes of tasks ``0..i``) or ``"new"`` (task ``i``'s own classes).
    """

    scenario: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    num_outputs: int
    class_loss: str = "seen"

    @classmethod
    def build(cls, scenario: str, tasks: Sequence[Task], *, class_loss: str = "seen") -> HeadLayout:
        """The layout of a task sequence under a scenario.

        Raises:
          ValueError: on an unknown scenario or ``class_loss``, or an empty task sequence.
        """
        if scenario not in SCENARIOS:
            raise ValueError(f"{scenario=} must be one of {SCENARIOS}")
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"{class_loss=} must be one of {CLASS_LOSSES}")
        if len(tasks) == 0:
            raise ValueError("tasks is empty: the task sequence needs at least one task")
        sizes = tuple(t.num_classes for t in tasks)
        if scenario == "domain":
            return cls(scenario, (0,) * len(sizes), sizes, max(sizes), class_loss)
        offsets = tuple(int(v) for v in np.cumsum((0, *sizes[:-1])))
        return cls(scenario, offsets, sizes, int(sum(sizes)), class_loss)

    def _range(self, i: int) -> np.ndarray:
        m = np.zeros(self.num_outputs, bool)
        m[self.offsets[i] : self.offsets[i] + self.sizes[i]] = True
        return m

    def _seen(self, i: int) -> np.ndarray:
        m = np.zeros(self.num_outputs, bool)
        m[: self.offsets[i] + self.sizes[i]] = True
        return m

    def train_mask(self, i: int) -> np.ndarray:
        """Outputs the loss of task ``i`` sees: its own head for ``"task"`` (and ``"class"``
        with ``class_loss="new"``), the classes seen so far for ``"class"``, all for
        ``"domain"``."""
        if self.scenario == "task" or (self.scenario == "class" and self.class_loss == "new"):
            return self._range(i)
        if self.scenario == "class":
            return self._seen(i)
        return np.ones(self.num_outputs, bool)

    def eval_mask(self, i: int, after: int | None = None) -> np.ndarray:
        """Outputs among which task ``i`` is evaluated after training task ``after``.

        ``"task"``: task ``i``'s head (the task id is given); ``"class"``: the classes of
        tasks ``0..max(i, after)`` (all seen classes, no task id; ``after=None`` reads as
        ``i``); ``"domain"``: all outputs.
        """
        if self.scenario == "task":
            return self._range(i)
        if self.scenario == "class":
            return self._seen(i if after is None else max(i, after))
        return np.ones(self.num_outputs, bool)

    def old_mask(self, i: int) -> np.ndarray:
        """Outputs of tasks before ``i`` (all outputs in ``"domain"``): what LwF distills."""
        if self.scenario == "domain":
            return np.full(self.num_outputs, i > 0)
        m = np.zeros(self.num_outputs, bool)
        for k in range(i):
            m |= self._range(k)
        return m

    def global_labels(self, y: np.ndarray, i: int) -> np.ndarray:
        return (np.asarray(y) + self.offsets[i]).astype(np.int32)

    def batch(self, raw: dict, i: int) -> dict:
        """A runner batch: ``x``, global ``y``, the masks and the task index."""
        return {
            "x": raw["x"],
            "y": self.global_labels(raw["y"], i),
            "mask": self.train_mask(i),
            "old_mask": self.old_mask(i),
            "task": np.asarray(i, np.int32),
        }


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """What a between-task hook is told about the task at hand.

    Attributes:
      index: task index ``j``.
      tasks: the whole sequence.
      layout: the :class:`HeadLayout`.
      apply_fn: ``apply_fn(params, x) -> logits``.
      seed: the run's seed.
    """

    index: int
    tasks: tuple[Task, ...]
    layout: HeadLayout
    apply_fn: Callable[[Any, jax.Array], jax.Array]
    seed: int

    @property
    def task(self) -> Task:
        return self.tasks[self.index]

    def train_batch(self, n: int) -> dict:
        """The first ``n`` training examples of the task as a runner batch (for hooks)."""
        x, y = self.task.split("train")
        n = min(n, len(y))
        return self.layout.batch({"x": x[:n], "y": y[:n]}, self.index)


def _no_state(params: Any) -> EmptyState:
    del params
    return EmptyState()


def _keep(params: Any, state: Any, *, step: Any = None) -> tuple[Any, Any]:
    del step
    return params, state


def _no_loss(
    params: Any, batch: dict, logits: jax.Array, state: Any, apply_fn: Callable
) -> tuple[jax.Array, dict[str, jax.Array]]:
    del params, batch, logits, state, apply_fn
    return jnp.zeros((), jnp.float32), {}


def _same_state(state: TrainState, ctx: TaskContext) -> TrainState:
    del ctx
    return state


def _same_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    return optimizer


class Method(NamedTuple):
    """A continual-learning method: a NamedTuple of pure hooks, built by a factory.

    The protocol of every stateful method (:mod:`cljax.stateful`): ``init`` first, then
    ``update`` in optax's order, plus the hooks of a task sequence. Every hook defaults to
    the identity, so ``Method()`` is naive fine-tuning and a factory fills in what its
    method needs (``Method(init=..., loss=..., end_task=..., name="ewc")``). What changes
    lives in the state, not in the object: one method serves any number of runs.

    Attributes:
      init: ``init(params) -> state``, stored in ``TrainState.methods[name]``: a pytree
        of fixed structure (checkpoints restore into it); the library's methods return a
        NamedTuple, ``EmptyState()`` where they keep none.
      update: ``update(params, state, *, step) -> (params, new_state)``, applied after
        every optimiser update inside the jitted step (``step`` is ``TrainState.step``
        after it), e.g. a weight average.
      loss: ``loss(params, batch, logits, state, apply_fn) -> (term, metrics)``: an extra
        loss term, traced inside the jitted step, and scalar metrics. ``batch`` holds
        ``x``, the global labels ``y``, ``mask``, ``old_mask``, ``task`` and ``key``, a
        PRNG key of its own for this method and step (e.g. augmentation).
      begin_task: ``begin_task(train_state, ctx) -> train_state``, before training task
        ``ctx.index`` (:class:`TaskContext`).
      end_task: ``end_task(train_state, ctx) -> train_state``, after training task
        ``ctx.index``, before its evaluation. Both call the library's
        ``<method>_next_task`` functions.
      wrap_optimizer: ``wrap_optimizer(optimizer) -> optimizer``, the optimiser actually
        used (e.g. ``optax.chain(optimizer, projection)``).
      persistent_states: optax sub-state types to carry over when the runner resets the
        optimiser between tasks (a projection memory must survive a reset).
      name: key of the method's state in ``TrainState.methods`` (unique within a run).

    Example::

      counter = Method(
          init=lambda params: jnp.zeros((), jnp.int32),
          update=lambda params, n, *, step: (params, n + 1),
          name="steps",
      )
    """

    init: Callable[[Any], Any] = _no_state
    update: Callable[..., tuple[Any, Any]] = _keep
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]] = _no_loss
    begin_task: Callable[[TrainState, TaskContext], TrainState] = _same_state
    end_task: Callable[[TrainState, TaskContext], TrainState] = _same_state
    wrap_optimizer: Callable[[optax.GradientTransformation], Any] = _same_optimizer
    persistent_states: tuple[type, ...] = ()
    name: str = "naive"


def cross_entropy_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """Mean cross-entropy over the outputs in ``batch["mask"]`` with global labels."""
    z = jnp.where(batch["mask"], logits.astype(jnp.float32), _NEG)
    return optax.softmax_cross_entropy_with_integer_labels(z, batch["y"]).mean()


@dataclasses.dataclass
class ContinualResult:
    """The outcome of :func:`run_sequence`.

    Attributes:
      accuracy: ``[T, T]`` accuracy matrix, ``accuracy[j, i]`` after task j on task i.
      initial: ``[T]`` accuracies before any training (FWT baseline), or None.
      metrics: :func:`cljax.continual.summarize` of ``accuracy`` (with FWT if ``initial``).
      state: the final :class:`TrainState`.
      losses: per task, the mean training loss of its last 10 % steps.
      resumed_from: task index the run resumed at (0 for a fresh run).
      resumed_at_step: step within task ``resumed_from`` it resumed at (0 at a boundary).
      skipped: optimiser steps skipped for a non-finite loss, gradient or update over the
        whole run (``nonfinite="skip"``; always 0 with ``"raise"``).
    """

    accuracy: np.ndarray
    initial: np.ndarray | None
    metrics: dict[str, float]
    state: TrainState
    losses: list[float]
    resumed_from: int
    resumed_at_step: int = 0
    skipped: int = 0


def _carry_states(fresh: Any, old: Any, types: Sequence[type]) -> Any:
    for cls in types:
        olds = iter(find_state(old, cls))
        fresh = jax.tree.map(
            lambda x, cls=cls, olds=olds: next(olds) if isinstance(x, cls) else x,
            fresh,
            is_leaf=lambda x, cls=cls: isinstance(x, cls),
        )
    return fresh


def _check_finite(tree: Any, what: str) -> None:
    where = _nonfinite_leaf(tree)
    if where is not None:
        raise NonFiniteError(f"{what}: leaf {where!r} holds NaN or Inf")


def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _accuracy_fn(apply_fn):
    @jax.jit
    def correct(params, x, y, mask):
        z = jnp.where(mask, apply_fn(params, x).astype(jnp.float32), _NEG)
        return jnp.sum(jnp.argmax(z, -1) == y)

    return correct


def run_sequence(
    tasks: Sequence[Task],
    *,
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    optimizer: optax.GradientTransformation,
    steps_per_task: int,
    batch_size: int,
    methods: Method | Sequence[Method] = (),
    scenario: str = "domain",
    class_loss: str = "seen",
    task_loss: Callable[[jax.Array, dict], jax.Array] = cross_entropy_loss,
    eval_fn: Callable[[Any, int, Task], float] | None = None,
    eval_split: str = "test",
    eval_batch_size: int = 1000,
    evaluate_initial: bool = False,
    reset_optimizer: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
    checkpoint_every: int | None = None,
    nonfinite: str = "raise",
) -> ContinualResult:
    """Trains on ``tasks`` in order and returns the accuracy matrix and final state.

    Args:
      tasks: the task sequence (:class:`cljax.data.Task`).
      apply_fn: ``apply_fn(params, x) -> logits [B, layout.num_outputs]``.
      params: initial parameters.
      optimizer: base optax optimiser; each method may wrap it (``Method.wrap_optimizer``).
      steps_per_task: optimiser steps per task.
      batch_size: training batch size.
      methods: one :class:`Method` or several (hooks run in order, losses add up); none =
        naive.
      scenario: ``"task"``, ``"class"`` or ``"domain"`` (module docstring).
      class_loss: ``"class"`` scenario: train each task over the classes seen so far
        (``"seen"``) or over its new classes only (``"new"``); see :class:`HeadLayout`.
      task_loss: ``task_loss(logits, batch) -> scalar`` (default: masked cross-entropy).
      eval_fn: ``eval_fn(params, i, task) -> accuracy`` replacing the default argmax
        accuracy on ``eval_split`` with the scenario's masks (e.g. zero-shot CLIP heads).
      eval_split: split evaluated by the default ``eval_fn``.
      eval_batch_size: batch size of the default evaluation.
      evaluate_initial: also evaluate the initial model (the FWT baseline).
      reset_optimizer: re-initialise the optimiser state at each task start (as a fresh
        optimiser per task in the references), carrying over the methods'
        ``persistent_states`` (projection memories).
      seed: seeds the PRNG of the train state and the data order.
      checkpoint_dir: if given, the whole state (train state with method states, the
        accuracy matrix so far) is saved there at every task boundary, and a re-run with
        the same folder resumes after the last completed task.
      progress: optional ``progress(iterable, desc, total)`` wrapper (e.g. tqdm).
      checkpoint_every: if given (with ``checkpoint_dir``), the whole state is also saved
        every ``checkpoint_every`` optimiser steps of the run (counted over all tasks), in
        ``<checkpoint_dir>/mid_task``: the train state (parameters, optimiser state,
        method states, PRNG key), the step within the task (the data position, since
        batches are ``Task.batch_at(step)``), the accuracy matrix and losses so far. A
        re-run resumes at the newest one, without repeating ``begin_task``, and ends
        bit-identical to an uninterrupted run (on CPU). The interval may change between
        runs; mid-task checkpoints of a finished task are removed at its boundary.
      nonfinite: what a NaN or Inf in a step's loss, gradient or updated parameters does.
        ``"raise"`` (the default) stops the run with :class:`cljax.train.NonFiniteError`
        naming the first such step and its task, before anything of it is checkpointed
        or evaluated (the check runs at each mid-task checkpoint and at the end of each
        task, so the run may compute a few more steps before it stops).
        ``"skip"`` leaves the parameters, optimiser state and method states of that step
        unchanged (the PRNG key and ``state.step`` advance), counts it in
        ``state.skipped`` and :attr:`ContinualResult.skipped`, and reports the mean loss
        of the task's finite tail steps. Under either policy a non-finite state after a
        between-task hook (a method's ``end_task`` or ``begin_task``) raises
        :class:`cljax.train.NonFiniteError`, and no non-finite state is ever saved.

    Returns:
      A :class:`ContinualResult`.

    Raises:
      TypeError: if ``methods`` holds something that is not a :class:`Method`.
      ValueError: on an empty sequence, an unknown scenario, a non-positive step count or
        batch size, duplicate method names, a ``checkpoint_every`` that is not a positive
        int or comes without ``checkpoint_dir``, an unknown ``nonfinite`` policy, or a
        checkpoint of another run (another number of tasks; for mid-task checkpoints also
        another ``steps_per_task``, ``batch_size`` or ``seed``).
      cljax.train.NonFiniteError: with ``nonfinite="raise"``, at the first step whose loss,
        gradient or update is not finite (naming the step and the task); under either
        policy, when a between-task hook leaves a non-finite state.

    A damaged checkpoint (see :class:`cljax.checkpoint.CheckpointManager`) is moved aside
    with a warning and the run resumes from the previous good one, or starts over.

    Example::

      tasks = cljax.data.permuted_mnist(10)
      result = run_sequence(tasks, apply_fn=lambda p, x: model.apply({"params": p}, x),
                            params=params, optimizer=optax.adam(1e-3), steps_per_task=200,
                            batch_size=32, methods=[gpm(...)], scenario="domain")
      print(result.metrics["acc"], result.metrics["bwt"])

    References:
      Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
      (the accuracy matrix); van de Ven & Tolias, "Three scenarios for continual learning",
      2019 (task-, domain- and class-incremental).
    """
    tasks = tuple(tasks)
    layout = HeadLayout.build(scenario, tasks, class_loss=class_loss)
    if steps_per_task < 1:
        raise ValueError(f"{steps_per_task=} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"{batch_size=} must be >= 1")
    methods = [methods] if isinstance(methods, Method) else list(methods)
    for k, m in enumerate(methods):
        if not isinstance(m, Method):
            raise TypeError(
                f"run_sequence: methods[{k}] is a {type(m).__name__}, not a "
                "cljax.continual.Method; build one with a factory such as "
                "cljax.continual.ewc(weight=...)"
            )
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique; got {names}")
    _loop.check_every(checkpoint_every, checkpoint_dir)
    if not isinstance(nonfinite, str) or nonfinite not in NONFINITE:
        raise ValueError(f"{nonfinite=} must be one of {NONFINITE}")
    progress = progress or (lambda it, desc, total: it)

    tx = optimizer
    for m in methods:
        tx = m.wrap_optimizer(tx)
    keep_types = tuple(t for m in methods for t in m.persistent_states)
    # The step donates the state: work on a copy so the caller's arrays stay alive.
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    state = TrainState.create(
        params, tx, key=seed, methods={m.name: m.init(params) for m in methods}
    )
    n_tasks = len(tasks)
    acc = np.zeros((n_tasks, n_tasks), np.float64)
    initial = np.zeros(n_tasks, np.float64) if evaluate_initial else None
    losses: list[float] = []

    correct = _accuracy_fn(apply_fn)

    def evaluate(p, i, after):
        if eval_fn is not None:
            return float(eval_fn(p, i, tasks[i]))
        hits, n = 0, 0
        mask = layout.eval_mask(i, after)
        for b in tasks[i].eval_batches(eval_batch_size, eval_split):
            hits += int(correct(p, b["x"], layout.global_labels(b["y"], i), mask))
            n += len(b["y"])
        return hits / max(n, 1)

    start, start_step, tail0 = 0, 0, []
    ckpt = mid = None
    if checkpoint_dir is not None:
        ckpt = CheckpointManager(checkpoint_dir, keep=2)
        mid_dir = ckpt.directory / "mid_task"
        if checkpoint_every is not None or mid_dir.is_dir():
            mid = CheckpointManager(mid_dir, keep=2)
    identity = {"steps_per_task": steps_per_task, "batch_size": batch_size, "seed": seed}
    restored = None
    if ckpt is not None:
        target = {
            "state": state,
            "acc": acc,
            "initial": np.zeros(n_tasks) if initial is None else initial,
            "losses": np.zeros(n_tasks),
        }

        def other_boundary(meta: dict) -> str | None:
            if meta.get("num_tasks") == n_tasks:
                return None
            return (
                f"checkpoint in {checkpoint_dir} is of a {meta.get('num_tasks')}-task run; "
                f"this run has {n_tasks} tasks (use another folder)"
            )

        other_mid = _loop.other_run(
            {"num_tasks": n_tasks, **identity},
            what=f"mid-task checkpoint in {ckpt.directory / 'mid_task'}",
        )

        restored = _loop.restore_latest(ckpt, target, other_boundary)
        if restored is not None:
            start, tree, meta = restored
        # A mid-task checkpoint is newer than the last boundary if it is in a later task.
        in_task = None if mid is None else _loop.restore_latest(mid, target, other_mid)
        if in_task is not None and in_task[2].get("task", -1) >= start:
            _, tree, meta = restored = in_task
            start, start_step = int(meta["task"]), int(meta["task_step"])
            tail0 = _loop.floats_from_metadata(meta["tail"], meta["tail_dtype"])
        if restored is not None:
            _, tree, _ = restored
            state = tree["state"].replace(tx=tx)
            acc = np.asarray(tree["acc"], np.float64)
            if initial is not None:
                initial = np.asarray(tree["initial"], np.float64)
            losses = [float(v) for v in np.asarray(tree["losses"])[:start]]

    if initial is not None and restored is None:
        initial[:] = [evaluate(state.params, i, 0) for i in range(n_tasks)]

    def snapshot() -> dict:
        padded = np.zeros(n_tasks)
        padded[: len(losses)] = losses
        return {
            "state": state,
            "acc": acc,
            "initial": np.zeros(n_tasks) if initial is None else initial,
            "losses": padded,
        }

    def loss_fn(p, batch, key, mstates):
        logits = apply_fn(p, batch["x"])
        loss = task_loss(logits, batch)
        aux = {"task_loss": loss}
        keys = jax.random.split(key, max(len(methods), 1))
        for m, k in zip(methods, keys, strict=False):
            mb = {**batch, "key": k}
            extra, a = m.loss(p, mb, logits, mstates[m.name], apply_fn)
            loss = loss + extra
            aux.update({f"{m.name}/{k}": v for k, v in a.items()})
        return loss, aux

    def step(st: TrainState, batch: dict, bad_at: jax.Array, at: jax.Array):
        key, sub = jax.random.split(st.key)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            st.params, batch, sub, st.methods
        )
        new = st.apply_gradients(grads)
        for m in methods:
            p, ms = m.update(new.params, new.methods[m.name], step=new.step)
            new = new.replace(params=p, methods={**new.methods, m.name: ms})
        ok = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new.params)
        ok = ok & _all_finite(new.methods)

        def pick(a, b):
            return jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)

        new = new.replace(
            params=pick(new.params, st.params),
            opt_state=pick(new.opt_state, st.opt_state),
            methods=pick(new.methods, st.methods),
            skipped=st.skipped + (~ok).astype(st.skipped.dtype),
            key=key,
        )
        bad_at = jnp.where((bad_at < 0) & ~ok, at, bad_at)
        return new, bad_at, {"loss": loss, "finite": ok, **aux}

    step = jax.jit(step, donate_argnums=(0,))
    bad_at = jnp.asarray(-1, jnp.int32)  # the first non-finite step (within its task)

    def check_steps(j: int) -> None:
        if nonfinite == "raise" and int(bad_at) >= 0:
            raise NonFiniteError(
                f"non-finite loss, gradient or update at step {int(bad_at)} of task {j} "
                f"({tasks[j].name!r}); the update was not applied and nothing after it "
                "was checkpointed (pass nonfinite='skip' to skip such steps)"
            )

    def check_hook(j: int, where: str) -> None:
        _check_finite(
            {"params": state.params, "methods": state.methods},
            f"the state after the {where} hooks of task {j} ({tasks[j].name!r})",
        )

    tail_from = steps_per_task - max(1, steps_per_task // 10)
    for j in range(start, n_tasks):
        ctx = TaskContext(j, tasks, layout, apply_fn, seed)
        first = start_step if j == start else 0  # > 0: resumed inside task j
        if first == 0:
            if reset_optimizer and j > 0:
                fresh = tx.init(state.params)
                state = state.replace(opt_state=_carry_states(fresh, state.opt_state, keep_types))
            for m in methods:
                state = m.begin_task(state, ctx)
            if methods:
                check_hook(j, "begin_task")
        # A fresh optimiser state, a hook's new arrays or a restored run's are uncommitted:
        # committed like the step's outputs, the task's first step reuses the compiled step.
        state, bad_at = commit_arrays((state, bad_at))
        tail: list[Any] = list(tail0) if first > 0 else []
        steps = range(first, steps_per_task)
        for s in progress(steps, f"task {j}", len(steps)):
            raw = tasks[j].batch_at(s, batch_size, seed=seed * 1000 + j)
            state, bad_at, metrics = step(state, layout.batch(raw, j), bad_at, np.int32(s))
            if s >= tail_from:
                tail.append(jnp.where(metrics["finite"], metrics["loss"], jnp.nan))
            done = j * steps_per_task + s + 1  # optimiser steps of the run so far
            end = s + 1 == steps_per_task
            if mid is not None and _loop.due(done, checkpoint_every, segment_end=end):
                check_steps(j)
                floats, dtype = _loop.floats_to_metadata(tail)
                meta = {
                    "num_tasks": n_tasks,
                    "task": j,
                    "task_step": s + 1,
                    "tail": floats,
                    "tail_dtype": dtype,
                    "scenario": scenario,
                    **identity,
                }
                _loop.save(mid, done, snapshot(), meta)
        check_steps(j)
        tail_host = np.asarray(jax.device_get(tail))
        finite_tail = tail_host[np.isfinite(tail_host)]
        if len(finite_tail) == len(tail_host):
            losses.append(float(np.mean(tail_host)))
        else:  # skipped steps: the mean of the finite ones (NaN if none)
            losses.append(float(np.mean(finite_tail)) if len(finite_tail) else float("nan"))
        for m in methods:
            state = m.end_task(state, ctx)
        if methods:
            check_hook(j, "end_task")
        acc[j] = [evaluate(state.params, i, j) for i in range(n_tasks)]
        if ckpt is not None:
            meta = {"num_tasks": n_tasks, "completed": j + 1, "scenario": scenario, **identity}
            _loop.save(ckpt, j + 1, snapshot(), meta)
            if mid is not None:  # the boundary supersedes this task's mid-task checkpoints
                for old in mid.steps():
                    shutil.rmtree(mid.path(old), ignore_errors=True)
    metrics = summarize(acc, baseline=initial)
    return ContinualResult(
        acc, initial, metrics, state, losses, start, start_step, int(state.skipped)
    )
