"""LwF: distillation of the previous model's (old-task) outputs, with a temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax._checks import check_scalar

__all__ = ["lwf_distillation"]


def lwf_distillation(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 2.0,
    where: jax.typing.ArrayLike | None = None,
    scale_by_t2: bool = False,
) -> jax.Array:
    """``mean_rows CE(softmax(t / T), log_softmax(s / T))``, optionally times ``T^2``.

    Li & Hoiem's LwF loss for old-task outputs is the cross-entropy between the temperature
    softened teacher and student distributions (T = 2, no ``T^2``); ZSCL's KD multiplies by
    ``T^2`` (``scale_by_t2=True``) so gradients keep their scale across temperatures.

    Args:
      student_logits: ``[..., C]`` current model outputs.
      teacher_logits: ``[..., C]`` outputs of the frozen previous model (no gradient).
      temperature: T > 0.
      where: optional boolean ``[C]`` (or broadcastable) mask of the classes distilled
        (the old tasks' heads); the softmax runs over those only.
      scale_by_t2: multiply by ``T^2``.

    Returns:
      A float32 scalar (mean over all leading positions).

    Raises:
      ValueError: on a non-positive or non-finite temperature or mismatched shapes.

    Example::

      loss = ce + lwf_distillation(logits, old_logits, temperature=2.0, where=old_classes)

    References:
      Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017; Hinton et al.,
      "Distilling the Knowledge in a Neural Network", 2015.
    """
    check_scalar(temperature, name="temperature", where="lwf_distillation", low=0.0, low_open=True)
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(
            f"lwf_distillation: student {jnp.shape(student_logits)} and teacher "
            f"{jnp.shape(teacher_logits)} logits differ in shape"
        )
    s = student_logits.astype(jnp.float32) / temperature
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    if where is not None:
        where = jnp.broadcast_to(jnp.asarray(where, bool), s.shape)
        s = jnp.where(where, s, -jnp.inf)
        t = jnp.where(where, t, -jnp.inf)
    p = jax.nn.softmax(t, axis=-1)
    logq = jax.nn.log_softmax(s, axis=-1)
    ce = -jnp.sum(jnp.where(p > 0, p * logq, 0.0), axis=-1)
    loss = jnp.mean(ce)
    return loss * temperature**2 if scale_by_t2 else loss
