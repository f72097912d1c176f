"""aTLAS objectives (what :func:`cljax.merging.atlas.fit` minimises) and optimiser presets.

Each objective is a ``loss_fn(params, batch, key)`` over the composed parameters, so any
model and head layout works: supervised few-shot learning, task addition, task negation
and the unsupervised test-time objectives of the reference. The presets are its optimisers
of Λ.

References:
  Zhang, Fournier, Gould et al., "Knowledge Composition using Task Vectors with Learned
  Anisotropic Scaling", NeurIPS 2024 (arXiv:2407.02880).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from cljax import tree as ct
from cljax.losses._entropy import entropy_loss, pseudo_label_loss

__all__ = [
    "default_optimizer",
    "entropy_objective",
    "few_shot_optimizer",
    "negation_score",
    "pseudo_label_objective",
    "supervised_objective",
    "task_addition_objective",
    "task_negation_objective",
]

Params = ct.Params

LogitsFn = Callable[[Params, Any], jax.Array]
LossFn = Callable[[Params, Any, jax.Array], Any]


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _acc(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def supervised_objective(logits_fn: LogitsFn) -> LossFn:
    """Cross-entropy on labelled batches ``{"x", "y"}`` (few-shot aTLAS).

    Args:
      logits_fn: ``logits_fn(params, batch) -> [batch, classes]`` (model and frozen head;
        the batch dict may carry more than ``"x"``, e.g. the head's parameters).

    Returns:
      ``loss_fn(params, batch, key) -> (loss, {"accuracy"})`` for :func:`fit`.

    References:
      aTLAS (NeurIPS 2024), few-shot learning (``src/learn_few_shots.py``).
    """

    def loss_fn(params, batch, key):
        del key
        logits = logits_fn(params, batch)
        return _ce(logits, batch["y"]), {"accuracy": _acc(logits, batch["y"])}

    return loss_fn


def task_addition_objective(apply_fns: Sequence[LogitsFn]) -> LossFn:
    """Σ_t CE_t: each task's sub-batch goes through its own frozen head.

    Args:
      apply_fns: one ``logits_fn(params, sub_batch)`` per task (shared encoder, task head);
        the same function may serve every task when the sub-batch carries its head.

    Returns:
      ``loss_fn(params, batches, key)`` where ``batches`` is a sequence of ``{"x", "y"}``,
      one per task, in the order of ``apply_fns``; aux holds ``ce_<t>`` per task.

    Raises:
      ValueError: if ``apply_fns`` is empty.

    References:
      aTLAS (NeurIPS 2024), task addition (``src/learn_task_addition.py``).
    """
    apply_fns = tuple(apply_fns)
    if not apply_fns:
        raise ValueError("apply_fns is empty: task addition needs at least one task")

    def loss_fn(params, batches, key):
        del key
        if len(batches) != len(apply_fns):
            raise ValueError(f"got {len(batches)} sub-batches for {len(apply_fns)} tasks")
        ces = [_ce(f(params, b), b["y"]) for f, b in zip(apply_fns, batches, strict=True)]
        return sum(ces), {f"ce_{i}": c for i, c in enumerate(ces)}

    return loss_fn


def task_negation_objective(target_fn: LogitsFn, control_fn: LogitsFn) -> LossFn:
    """−CE(target) + CE(control): forget the target task, keep the control task.

    Args:
      target_fn: ``logits_fn(params, batch)`` of the task to forget.
      control_fn: ``logits_fn(params, batch)`` of the control task.

    Returns:
      ``loss_fn(params, {"target": batch, "control": batch}, key)``.

    References:
      aTLAS (NeurIPS 2024), task negation (``src/learn_task_negation.py``).
    """

    def loss_fn(params, batch, key):
        del key
        ce_t = _ce(target_fn(params, batch["target"]), batch["target"]["y"])
        ce_c = _ce(control_fn(params, batch["control"]), batch["control"]["y"])
        return -ce_t + ce_c, {"ce_target": ce_t, "ce_control": ce_c}

    return loss_fn


def entropy_objective(logits_fn: LogitsFn) -> LossFn:
    """Unsupervised test-time adaptation by entropy minimisation on batches ``{"x"}``.

    References:
      Wang et al., Tent, ICLR 2021; aTLAS (NeurIPS 2024), test-time adaptation.
    """

    def loss_fn(params, batch, key):
        del key
        return entropy_loss(logits_fn(params, batch))

    return loss_fn


def pseudo_label_objective(
    logits_fn: LogitsFn,
    *,
    threshold: float = 0.99,
    hard: bool = False,
    normalize: Literal["confident", "batch"] = "confident",
) -> LossFn:
    """Unsupervised FixMatch-style objective on batches ``{"weak", "strong"}`` (two views).

    ``logits_fn(params, batch)`` is called with the batch whose ``"x"`` is each view in
    turn. See :func:`cljax.losses.pseudo_label_loss` for the arguments.

    Raises:
      ValueError: on a threshold outside [0, 1).

    References:
      Sohn et al., FixMatch, NeurIPS 2020; aTLAS (NeurIPS 2024), ``src/learn_ufm.py``.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{threshold=} must be in [0, 1)")

    def loss_fn(params, batch, key):
        del key
        weak = logits_fn(params, {**batch, "x": batch["weak"]})
        strong = logits_fn(params, {**batch, "x": batch["strong"]})
        loss = pseudo_label_loss(weak, strong, threshold=threshold, hard=hard, normalize=normalize)
        conf = jnp.mean(jnp.max(jax.nn.softmax(weak.astype(jnp.float32), -1), -1) > threshold)
        return loss, {"confident": conf}

    return loss_fn


def negation_score(
    control_floor: float, *, target: str = "target_accuracy", control: str = "control_accuracy"
) -> Callable[[Mapping[str, float]], float | None]:
    """Selection rule of task negation: lowest target accuracy with control ≥ a floor.

    Args:
      control_floor: the minimum control accuracy (the reference: 0.95 × zero-shot).
      target, control: metric names in the evaluation dict.

    Returns:
      ``score(metrics)``: ``-metrics[target]`` when the control constraint holds, else
      ``None`` (inadmissible), for :func:`fit`'s ``score``.
    """

    def score(m):
        return -float(m[target]) if float(m[control]) >= control_floor else None

    return score


def default_optimizer(
    learning_rate: float | optax.Schedule = 1e-3,
    *,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """The reference's optimiser of Λ: gradient clipping 1.0, AdamW lr 1e-3, weight decay 0.1.

    Weight decay acts on Λ, so it pulls the composition back toward θ0.

    Raises:
      ValueError: on a non-positive constant learning rate or clip norm, or negative decay.
    """
    if not callable(learning_rate) and learning_rate <= 0:
        raise ValueError(f"{learning_rate=} must be positive")
    if weight_decay < 0:
        raise ValueError(f"{weight_decay=} must be >= 0")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"{clip_norm=} must be positive or None")
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    return tx if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), tx)


def few_shot_optimizer(
    total_steps: int, learning_rate: float = 0.1, *, weight_decay: float = 0.1
) -> optax.GradientTransformation:
    """Few-shot defaults of the reference: AdamW lr 0.1, cosine decay without warm-up, clip 1.0.

    Raises:
      ValueError: if ``total_steps`` < 1.
    """
    if total_steps < 1:
        raise ValueError(f"{total_steps=} must be >= 1")
    return default_optimizer(
        optax.cosine_decay_schedule(learning_rate, total_steps), weight_decay=weight_decay
    )
