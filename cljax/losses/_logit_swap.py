"""Logit-swap self-distillation (Mix-CPT): distil a teacher whose top logit is the label's."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax._checks import check_scalar

__all__ = ["logit_swap_distillation", "swap_top_logit"]


def swap_top_logit(teacher_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Swaps each row's largest logit with the label's logit where the two differ.

    Where the teacher already ranks the label first (or the label's logit ties the maximum),
    the row is unchanged. Everything else keeps its value, so the teacher's ranking of the
    other classes (its "dark knowledge") survives while its argmax becomes the label.

    Args:
      teacher_logits: ``[..., V]``.
      labels: ``[...]`` integer labels in ``[0, V)``.

    Returns:
      ``[..., V]`` logits, same dtype.

    Raises:
      ValueError: if the shapes disagree.
    """
    if jnp.shape(labels) != jnp.shape(teacher_logits)[:-1]:
        raise ValueError(
            f"swap_top_logit: labels {jnp.shape(labels)} must be the leading shape of the "
            f"logits {jnp.shape(teacher_logits)}"
        )
    z = jnp.asarray(teacher_logits)
    v = z.shape[-1]
    y = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, v - 1)
    top = jnp.argmax(z, axis=-1)
    z_top = jnp.take_along_axis(z, top[..., None], axis=-1)
    z_lab = jnp.take_along_axis(z, y[..., None], axis=-1)
    cls = jnp.arange(v)
    out = jnp.where(cls == top[..., None], z_lab, z)
    return jnp.where(cls == y[..., None], z_top, out)


def logit_swap_distillation(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    where: jax.typing.ArrayLike | None = None,
    scale_by_t2: bool = False,
) -> jax.Array:
    """``KL(softmax(swap(t) / T) || softmax(s / T))``, averaged over positions.

    Mix-CPT's logit swap self-distillation: during continual pre-training the frozen original
    model is the teacher; where its top prediction is not the ground-truth token, its top
    logit and the label's logit trade places (:func:`swap_top_logit`), so the target is the
    label while the teacher's distribution over the other tokens is kept, which limits
    forgetting of what the model knew. No gradient flows into the teacher.

    Args:
      student_logits: ``[..., V]`` logits of the model being trained.
      teacher_logits: ``[..., V]`` logits of the frozen teacher.
      labels: ``[...]`` integer labels; ignored (and free to be out of range, e.g. -100) where
        ``where`` is False.
      temperature: T > 0, applied to both after the swap.
      where: optional boolean ``[...]`` mask of the positions averaged (padding excluded).
      scale_by_t2: multiply by ``T^2`` (Hinton et al.'s gradient-scale correction).

    Returns:
      A float32 scalar; 0 when no position is selected.

    Raises:
      ValueError: on a temperature that is not positive and finite, or mismatched shapes.

    Example::

      loss = ce + logit_swap_distillation(logits, frozen_logits, tokens, where=tokens != -100)

    References:
      Jiang, Tang, Zhu, Zhao, Wen et al., "Mix-CPT: A Domain Adaptation Framework via
      Decoupling Knowledge Learning and Format Alignment", 2024 (logit swap self-distillation);
      Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """
    name = "logit_swap_distillation"
    check_scalar(temperature, name="temperature", where=name, low=0.0, low_open=True)
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(
            f"{name}: student {jnp.shape(student_logits)} and teacher "
            f"{jnp.shape(teacher_logits)} logits differ in shape"
        )
    lead = jnp.shape(teacher_logits)[:-1]
    if jnp.shape(labels) != lead:
        raise ValueError(f"{name}: labels {jnp.shape(labels)} must have shape {lead}")
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits)).astype(jnp.float32)
    t = swap_top_logit(t, labels) / temperature
    s = jnp.asarray(student_logits).astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(t, axis=-1)
    p = jnp.exp(logp)
    kl = jnp.sum(jnp.where(p > 0, p * (logp - jax.nn.log_softmax(s, axis=-1)), 0.0), axis=-1)
    if where is None:
        loss = jnp.mean(kl)
    else:
        w = jnp.broadcast_to(jnp.asarray(where, bool), lead)
        loss = jnp.sum(jnp.where(w, kl, 0.0)) / jnp.maximum(jnp.sum(w), 1)
    return loss * temperature**2 if scale_by_t2 else loss
