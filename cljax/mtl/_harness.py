"""A multi-task trainer for a shared trunk with task heads: model, batches, step, metrics."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.data import Task
from cljax.mtl._weighting import LossWeighting
from cljax.train import TrainState, raise_on_nonfinite
from cljax.train._step import keep_finite

__all__ = [
    "HEAD_RULES",
    "MultiHead",
    "classification_losses",
    "delta_m",
    "evaluate_accuracy",
    "make_mtl_step",
    "multitask_batch",
]

#: Path rules marking the heads of :class:`MultiHead` as task-specific.
HEAD_RULES = ((r"(^|/)head_\d+/", True),)


class MultiHead(nn.Module):
    """A shared trunk followed by one linear head per task (``head_0``, ``head_1``, ...).

    Attributes:
      trunk: any Flax module mapping inputs to features; keyword arguments of the call
        (e.g. ``train=True``) are passed to it.
      num_classes: classes of each task's head.
    """

    trunk: nn.Module
    num_classes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array, **kwargs: Any) -> list[jax.Array]:
        f = self.trunk(x, **kwargs)
        f = f.reshape(f.shape[0], -1)
        return [nn.Dense(n, name=f"head_{i}")(f) for i, n in enumerate(self.num_classes)]


def classification_losses(logits: Sequence[jax.Array], labels: jax.Array) -> jax.Array:
    """``[T]`` mean cross-entropies: task i's logits against ``labels[:, i]``."""
    return jnp.stack(
        [
            optax.softmax_cross_entropy_with_integer_labels(
                lg.astype(jnp.float32), labels[:, i]
            ).mean()
            for i, lg in enumerate(logits)
        ]
    )


def multitask_batch(
    tasks: Sequence[Task], step: int, batch_size: int, *, seed: int = 0, split: str = "train"
) -> dict[str, np.ndarray]:
    """The batch at ``step`` of tasks that share their inputs: ``{"x", "y": [B, T]}``.

    Raises:
      ValueError: if the tasks do not share the inputs of ``split``.
    """
    xs = [t.split(split)[0] for t in tasks]
    if any(x is not xs[0] and (x.shape != xs[0].shape) for x in xs):
        raise ValueError("multitask_batch: the tasks must share their inputs")
    bs = [t.batch_at(step, batch_size, seed=seed, split=split) for t in tasks]
    return {"x": bs[0]["x"], "y": np.stack([b["y"] for b in bs], axis=-1)}


def _takes_key(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return "key" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def make_mtl_step(
    grad_fn: Callable[..., Any],
    *,
    weighting: LossWeighting | None = None,
    nonfinite: Literal["apply", "skip", "raise"] = "raise",
    jit: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, batch) -> (state, metrics)`` from a multi-task gradient function.

    Two kinds of ``grad_fn``, told apart by whether it takes a ``key`` keyword:

    * the aggregator inside optax (recommended): :func:`cljax.mtl.task_grad_fn` or
      :func:`cljax.mtl.fmtl_grad_fn` return stacked per-task gradients, and ``state.tx``
      is ``optax.chain(cljax.mtl.aggregate(aggregator, ...), optimizer)``, which holds
      the aggregator's key;
    * a gradient function that aggregates itself (:func:`cljax.mtl.mtl_grad_fn`,
      :func:`cljax.mtl.fmtl`): it gets a key split from ``state.key`` each step.

    If ``state.methods`` holds ``"model_state"`` (e.g. ``{"batch_stats": ...}``, or
    ``{}``), it is passed to ``grad_fn`` after the batch (a loss ``loss_fn(params, batch,
    model_state) -> (losses, new_model_state)`` with ``has_aux=True``) and replaced by
    the clean pass's output; otherwise the loss is ``loss_fn(params, batch)``. With a
    ``weighting``, its state lives in ``state.methods["weighting"]`` and its weights
    scale the task losses.

    Args:
      grad_fn: ``grad_fn(params, batch, [model_state], [key=], weights=) -> (grads,
        info)``.
      weighting: optional :class:`cljax.mtl.LossWeighting`.
      nonfinite: a step whose task losses, gradients or updated parameters hold NaN/Inf
        (one task's NaN gradient spreads to all through the aggregator): ``"raise"`` (the
        default) leaves the state unchanged and raises
        :class:`cljax.train.NonFiniteError` naming the step; ``"skip"`` leaves it
        unchanged and counts it in ``state.skipped``; ``"apply"`` applies it. As in
        :func:`cljax.train.make_step`.
      jit: compile the step.
      donate: donate the input state (with ``jit``).

    Returns:
      The step; metrics hold ``loss`` (sum of task losses), ``losses`` ([T]), ``weights``
      ([T]), ``grad_norm`` (the norm of what ``grad_fn`` returned: with stacked per-task
      gradients, of all of them) and ``finite``.

    Raises:
      ValueError: for an unknown ``nonfinite`` policy.
      cljax.train.NonFiniteError: from the step, with ``nonfinite="raise"``.

    Example::

      >>> heads = [(r"^head_", True)]
      >>> tx = optax.chain(cljax.mtl.aggregate(cljax.mtl.pcgrad, key=0, head_rules=heads),
      ...                  optax.adam(1e-3))
      >>> state = TrainState.create(params, tx)
      >>> step = make_mtl_step(cljax.mtl.task_grad_fn(losses_fn))
      >>> state, metrics = step(state, batch)
    """
    if nonfinite not in ("apply", "skip", "raise"):
        raise ValueError(f"make_mtl_step: {nonfinite=} must be one of 'apply', 'skip', 'raise'")
    takes_key = _takes_key(grad_fn)

    def step(state: TrainState, batch: Any):
        key, k_agg, k_w = jax.random.split(state.key, 3)
        methods = dict(state.methods)
        args = (methods["model_state"],) if "model_state" in methods else ()
        w = None if weighting is None else weighting.weights(methods["weighting"], k_w)
        kw = {"key": k_agg} if takes_key else {}
        grads, info = grad_fn(state.params, batch, *args, weights=w, **kw)
        new = state.apply_gradients(grads)
        if args and info.get("aux") is not None:
            methods["model_state"] = info["aux"]
        if weighting is not None:
            _, methods["weighting"] = weighting.update(
                info["losses"], methods["weighting"], key=k_w
            )
        new = new.replace(key=key, methods=methods)
        losses = info["losses"]
        gnorm = optax.tree.norm(grads)
        finite = jnp.all(jnp.isfinite(losses)) & jnp.isfinite(gnorm)
        if nonfinite != "apply":
            new, finite = keep_finite(state, new, finite)
        metrics = {
            "loss": jnp.sum(losses),
            "losses": losses,
            "weights": jnp.ones_like(losses) if w is None else w,
            "grad_norm": gnorm,
            "finite": finite,
        }
        return new, metrics

    if jit:
        step = jax.jit(step, donate_argnums=(0,) if donate else ())
    return raise_on_nonfinite(step) if nonfinite == "raise" else step


def evaluate_accuracy(
    predict: Callable[[jax.Array], Sequence[jax.Array]],
    tasks: Sequence[Task],
    *,
    batch_size: int = 500,
    split: str = "test",
) -> np.ndarray:
    """Per-task accuracy (%) of ``predict(x) -> [logits_task_0, ...]`` on a shared split."""
    correct = np.zeros(len(tasks))
    n = 0
    x, _ = tasks[0].split(split)
    ys = np.stack([t.split(split)[1] for t in tasks], axis=-1)
    for i in range(0, len(x), batch_size):
        logits = predict(jnp.asarray(x[i : i + batch_size]))
        y = ys[i : i + batch_size]
        for k, lg in enumerate(logits):
            correct[k] += float(np.sum(np.asarray(jnp.argmax(lg, -1)) == y[:, k]))
        n += len(y)
    return 100.0 * correct / max(n, 1)


def delta_m(
    values: Sequence[float],
    baseline: Sequence[float],
    higher_is_better: Sequence[bool] | bool = True,
) -> float:
    """Δm%: the mean relative change against single-task baselines, in percent.

    ``Δm = 100/T * sum_i (-1)^{l_i} (M_i - M_b,i) / M_b,i`` with ``l_i = 1`` where lower is
    better. Positive is better.

    Raises:
      ValueError: on length mismatches or a zero baseline.

    References:
      Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019.
    """
    v, b = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    if v.shape != b.shape or v.ndim != 1:
        raise ValueError(f"delta_m: values {v.shape} and baseline {b.shape} must be equal [T]")
    if np.any(b == 0):
        raise ValueError("delta_m: a baseline metric is 0")
    hib = np.broadcast_to(np.asarray(higher_is_better, bool), v.shape)
    sign = np.where(hib, 1.0, -1.0)
    return float(100.0 * np.mean(sign * (v - b) / b))
