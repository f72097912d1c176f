"""The aTLAS trainer: learns the coefficients Λ with optax, resumable from checkpoints.

Only Λ is trained; θ0 and the task vectors are arguments of the compiled step. The loop is
the library's resumable step loop (:mod:`cljax._loop`, shared with the continual runner):
the whole fit is checkpointed after every epoch (and every ``checkpoint_every`` steps), and
a re-run with the same folder resumes bit-identically.

References:
  Zhang, Fournier, Gould et al., "Knowledge Composition using Task Vectors with Learned
  Anisotropic Scaling", NeurIPS 2024 (arXiv:2407.02880).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import _loop
from cljax import tree as ct
from cljax.checkpoint import CheckpointManager
from cljax.merging._atlas_blocks import Blocks, blocks, partition_masks
from cljax.merging._atlas_compose import (
    _check_finite_coefficients,
    _flat_coefficients,
    compose,
    init,
)
from cljax.merging._atlas_objectives import LossFn, default_optimizer
from cljax.train import TrainState, apply_step, make_step, raise_on_nonfinite

__all__ = ["FitResult", "fit"]

Params = ct.Params
PyTree = ct.PyTree


_compose_jit = jax.jit(compose, static_argnums=(3,))


@functools.lru_cache(maxsize=64)
def _train_step(loss_fn: LossFn, spec: Blocks, has_aux: bool):
    """One compiled step per (objective, layout): repeated fits do not recompile.

    θ0, the task vectors, the masks and the batch are arguments of the step, so they may
    change between fits (another held-out task, another head carried in the batch) as long
    as their shapes do not.
    """

    def objective(c, packed, key):
        batch, theta0, taus, ms = packed
        return loss_fn(compose(theta0, taus, c, spec, masks=ms), batch, key)

    return make_step(objective, has_aux=has_aux)


@functools.lru_cache(maxsize=64)
def _split_train_step(loss_fn: LossFn, spec: Blocks, has_aux: bool):
    """:func:`_train_step` as three compiled programs: compose; the model's value and
    gradient at θ; the coefficient gradient (the VJP of :func:`compose`) and the update.

    The same arithmetic as the one-program step (bit-identical coefficients on the CPU);
    on XLA:CPU the one program spends more CPU time on the same fusions
    (``experiments/benchmarks/atlas_bench.py`` measures both). The update and metrics are
    :func:`cljax.train.apply_step`'s, as in :func:`cljax.train.make_step`.
    """
    compose_fn = jax.jit(lambda theta0, taus, c, ms: compose(theta0, taus, c, spec, masks=ms))
    model_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=has_aux))

    def update(state, theta0, taus, ms, g, out, key):
        _, vjp = jax.vjp(lambda c: compose(theta0, taus, c, spec, masks=ms), state.params)
        (grads,) = vjp(g)
        return apply_step(state, key, out, grads, has_aux=has_aux)

    update = jax.jit(update, donate_argnums=(0,))

    def step(state: TrainState, packed):
        batch, theta0, taus, ms = packed
        key, sub = jax.random.split(state.key)
        theta = compose_fn(theta0, taus, state.params, ms)
        out, g = model_grad(theta, batch, sub)
        del theta  # not needed by the update: free it before the τ pass
        return update(state, theta0, taus, ms, g, out, key)

    return raise_on_nonfinite(step)  # as make_step's default: a non-finite step raises


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      coefficients: the coefficients of the best epoch (epoch 0 = the initial ones).
      best_epoch: the epoch they come from.
      best_score: their score (``None`` if no epoch was admissible; then epoch 0 is kept).
      history: one dict per evaluated epoch: ``epoch``, ``score``, the evaluation metrics
        and the mean training loss.
      final_coefficients: the coefficients after the last step.
    """

    coefficients: PyTree
    best_epoch: int
    best_score: float | None
    history: list[dict]
    final_coefficients: PyTree


@functools.cache
def _default_tx() -> optax.GradientTransformation:
    # One instance for every fit without an optimiser: the optimiser is part of the compiled
    # step's static state, so a fresh `default_optimizer()` per call would recompile the step.
    return default_optimizer()


def _returns_aux(loss_fn: LossFn, spec: Blocks, args: tuple) -> bool:
    """Whether ``loss_fn`` returns ``(loss, aux)`` on ``args = (Λ, batch, θ0, τ, masks)``.

    Found by tracing the loss through :func:`compose` abstractly (a whole forward pass of
    the model), once per loss, layout and argument signature (tree structure, shapes and
    dtypes): a fit that repeats another's shapes does not trace the loss again.
    """
    leaves, treedef = jax.tree.flatten(args)
    return _returns_aux_abstract(loss_fn, spec, treedef, tuple(jax.typeof(x) for x in leaves))


@functools.lru_cache(maxsize=64)
def _returns_aux_abstract(loss_fn: LossFn, spec: Blocks, treedef, avals: tuple) -> bool:
    def probe(args, key):
        coefs, batch, theta0, taus, masks = args
        return loss_fn(compose(theta0, taus, coefs, spec, masks=masks), batch, key)

    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]
    key = jax.eval_shape(jax.random.key, 0)
    out = jax.eval_shape(probe, jax.tree.unflatten(treedef, shapes), key)
    return isinstance(out, tuple)


def fit(
    loss_fn: LossFn,
    pretrained: Params,
    task_vectors: Sequence[Params] | Params,
    batch_at: Callable[[int], Any],
    *,
    epochs: int,
    steps_per_epoch: int,
    spec: Blocks | None = None,
    coefficients: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
    evaluate: Callable[[Params], Mapping[str, float]] | None = None,
    score: str | Callable[[Mapping[str, float]], float | None] = "accuracy",
    stop: Callable[[Mapping[str, float]], bool] | None = None,
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    split_step: bool | None = None,
) -> FitResult:
    """Learns aTLAS coefficients Λ with optax, keeping the best epoch by a validation score.

    Model-agnostic: ``loss_fn`` sees composed parameters, so any model, head layout or
    objective works (see :func:`task_addition_objective`, :func:`task_negation_objective`,
    :func:`supervised_objective`, :func:`entropy_objective`,
    :func:`pseudo_label_objective`). Only Λ is trained; θ0 and the task vectors are
    arguments of the compiled step (not constants), and the step donates Λ and the
    optimiser state.

    After every epoch (and once before training, as the baseline), ``evaluate`` gets the
    composed parameters and returns metrics; ``score`` turns them into a number (higher is
    better, ``None`` = inadmissible) and the best epoch's coefficients are kept. ``stop``
    ends training early (task negation stops once control accuracy falls below its floor).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> loss`` or ``(loss, aux_dict)``.
      pretrained: θ0.
      task_vectors: T task vectors (stacked or a list).
      batch_at: ``batch_at(step) -> batch`` (random access, e.g. ``Task.batch_at``).
      epochs: number of epochs (>= 1).
      steps_per_epoch: steps per epoch (>= 1).
      spec: block layout (default: one block per leaf).
      coefficients: initial Λ (default :func:`init`, zeros).
      optimizer: default :func:`default_optimizer` (AdamW 1e-3, wd 0.1, clip 1.0).
      evaluate: ``evaluate(params) -> {metric: value}``; without it the last epoch is kept.
      score: a metric name or ``score(metrics) -> float | None``.
      stop: ``stop(metrics) -> bool`` checked after each evaluation.
      seed: integer seed of the PRNG key passed (split per step) to ``loss_fn``.
      progress: optional wrapper of the step iterator (a progress bar).
      checkpoint_dir: if given, the whole fit (coefficients, optimiser state, PRNG key,
        step, best-so-far coefficients, epoch and score, history) is saved there after
        every epoch, and a re-run with the same folder resumes; the result is
        bit-identical to an uninterrupted fit (on CPU). A finished fit only reloads.
      checkpoint_every: with ``checkpoint_dir``, also save every ``checkpoint_every``
        steps inside epochs (the losses of the epoch so far included).
      split_step: run each step as three compiled programs (compose; the model's forward
        and backward at θ; the coefficient gradient and update) instead of one. Same
        results; on XLA:CPU it is faster (``experiments/benchmarks/atlas_bench.py``).
        ``None``: split on the CPU, one program on accelerators.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: on ``epochs`` or ``steps_per_epoch`` < 1, mismatched inputs, initial
        ``coefficients`` holding NaN or Inf, a
        ``checkpoint_every`` that is not a positive int or comes without
        ``checkpoint_dir``, or a checkpoint of a fit with another ``steps_per_epoch`` or
        ``seed``.
      cljax.train.NonFiniteError: at the first step whose loss or coefficient gradient is
        not finite, naming it (the update is not applied and nothing is checkpointed).

    Example:
      >>> spec = blocks(params)
      >>> res = fit(supervised_objective(apply), params, tvs, task.batch_at,
      ...           epochs=10, steps_per_epoch=4, spec=spec,
      ...           evaluate=lambda p: {"accuracy": val_acc(p)})
      >>> theta = compose(params, tvs, res.coefficients, spec)

    References:
      aTLAS (NeurIPS 2024), ``src/learn_task_addition.py``, ``src/learn_few_shots.py``.
    """
    if epochs < 1:
        raise ValueError(f"{epochs=} must be >= 1")
    if steps_per_epoch < 1:
        raise ValueError(f"{steps_per_epoch=} must be >= 1")
    _loop.check_every(checkpoint_every, checkpoint_dir, where="fit: ")
    spec = blocks(pretrained) if spec is None else spec
    tvs = ct.as_stacked(task_vectors)
    coefs = init(pretrained, tvs, spec) if coefficients is None else coefficients
    masks = None
    if any(spec.partitioned):  # on the device once, not with every step's arguments
        on_device: dict[int, jax.Array] = {}  # blocks of one shape share one mask
        masks = [
            None if m is None else on_device.setdefault(id(m), jnp.asarray(m))
            for m in partition_masks(pretrained, spec)
        ]
    _compose_jit(pretrained, tvs, coefs, spec, masks=masks)  # validates eagerly
    _check_finite_coefficients(_flat_coefficients(coefs))
    score_fn = (lambda m: float(m[score])) if isinstance(score, str) else score
    tx = _default_tx() if optimizer is None else optimizer
    first = batch_at(0)  # outside the trace: batch_at may do host work (decoding, resizing)
    has_aux = _returns_aux(loss_fn, spec, (coefs, first, pretrained, tvs, masks))
    if split_step is None:
        split_step = jax.default_backend() == "cpu"
    make = _split_train_step if split_step else _train_step
    step = make(loss_fn, spec, has_aux)
    state = TrainState.create(jax.tree.map(jnp.array, coefs), tx, key=seed)

    def run_eval(c):
        if evaluate is None:
            return {}
        theta = _compose_jit(pretrained, tvs, c, spec, masks=masks)
        return {k: float(v) for k, v in evaluate(theta).items()}

    ckpt = None if checkpoint_dir is None else CheckpointManager(checkpoint_dir, keep=2)
    identity = {"steps_per_epoch": steps_per_epoch, "seed": seed}
    start, losses0, stopped = 0, [], False
    history: list[dict[str, Any]]

    other_fit = _loop.other_run(identity, what=f"fit: checkpoint in {checkpoint_dir}", run="fit")

    restored = None
    if ckpt is not None:
        restored = _loop.restore_latest(ckpt, {"state": state, "best": coefs}, other_fit)
    if restored is not None:
        start, tree, meta = restored
        state, history = tree["state"].replace(tx=tx), meta["history"]
        best: tuple[Any, int, float | None] = (tree["best"], meta["best_epoch"], meta["best_score"])
        losses0 = _loop.floats_from_metadata(meta["losses"], meta["loss_dtype"])
        stopped = meta["stopped"]
    else:
        history = []
        m0 = run_eval(state.params)
        s0 = score_fn(m0) if evaluate is not None else None
        history.append({"epoch": 0, "score": s0, **m0})
        best = (jax.tree.map(jnp.array, state.params), 0, s0)

    def save(ckpt: CheckpointManager, done: int, losses: list, stopped: bool = False) -> None:
        floats, dtype = _loop.floats_to_metadata(losses)
        meta = {
            "history": history,
            "best_epoch": best[1],
            "best_score": best[2],
            "losses": floats,
            "loss_dtype": dtype,
            "stopped": stopped,
            **identity,
        }  # numpy scalars (a score function's) as plain numbers
        meta = json.loads(json.dumps(meta, default=lambda v: np.asarray(v).item()))
        _loop.save(ckpt, done, {"state": state, "best": best[0]}, meta)

    for epoch in range(start // steps_per_epoch + 1, epochs + 1):
        if stopped:
            break
        first, end = max((epoch - 1) * steps_per_epoch, start), epoch * steps_per_epoch
        losses: list[Any] = list(losses0) if first > (epoch - 1) * steps_per_epoch else []
        it = range(first, end)
        for s in progress(it) if progress is not None else it:
            state, metrics = step(state, (batch_at(s), pretrained, tvs, masks))
            losses.append(metrics["loss"])
            if ckpt is not None and _loop.due(s + 1, checkpoint_every, segment_end=s + 1 == end):
                save(ckpt, s + 1, losses)
        m = run_eval(state.params)
        sc = score_fn(m) if evaluate is not None else float(-np.mean(jax.device_get(losses)))
        history.append(
            {"epoch": epoch, "score": sc, "train_loss": float(np.mean(jax.device_get(losses))), **m}
        )
        if sc is not None and (best[2] is None or sc > best[2] or evaluate is None):
            best = (jax.tree.map(jnp.array, state.params), epoch, sc)
        stopped = stop is not None and evaluate is not None and bool(stop(m))
        if ckpt is not None:
            save(ckpt, end, [], stopped)
    if evaluate is None:  # no validation: keep the last epoch
        best = (state.params, history[-1]["epoch"], history[-1]["score"])
    return FitResult(best[0], best[1], best[2], history, state.params)
