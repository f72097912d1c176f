"""ZSCL's feature distillation on a reference set, against fixed reference embeddings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax._checks import check_int, check_scalar

__all__ = [
    "kd_loss",
    "reference_embeddings",
    "zscl_distillation",
]


def kd_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 2.0
) -> jax.Array:
    """Knowledge distillation: ``mean_rows CE(softmax(t / T), s / T) * T**2``.

    The cross-entropy of the student's tempered log-softmax under the teacher's tempered
    softmax, over the last axis, averaged over the rows. The teacher is not differentiated.

    Args:
      student_logits: ``[..., K]``.
      teacher_logits: ``[..., K]``, same shape.
      temperature: ``T > 0``.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: for a non-positive or non-finite temperature, mismatched shapes or an
        empty axis.

    Example:
      >>> t = jnp.array([[2.0, 0.0]]); kd_loss(t, t) > 0  # the teacher's entropy, times T^2
      Array(True, dtype=bool)

    References:
      Hinton et al., "Distilling the Knowledge in a Neural Network", 2015; ZSCL's
      ``distillation`` (``mtil/src/models/helpers.py``).
    """
    check_scalar(temperature, name="temperature", where="kd_loss", low=0.0, low_open=True)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"kd_loss: {student_logits.shape=} differs from {teacher_logits.shape=}")
    if teacher_logits.ndim < 1 or teacher_logits.shape[-1] == 0 or teacher_logits.size == 0:
        raise ValueError(f"kd_loss: empty logits {teacher_logits.shape=}")
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    ce = -jnp.sum(jax.nn.softmax(t, axis=-1) * jax.nn.log_softmax(s, axis=-1), axis=-1)
    return jnp.mean(ce) * temperature**2


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def reference_embeddings(
    embed_fn: Callable[[Any], jax.Array],
    inputs: jax.Array | np.ndarray,
    *,
    batch_size: int = 256,
    normalize: bool = True,
) -> jax.Array:
    """Embeds a reference set once with the frozen teacher: the cache ZSCL should use.

    ZSCL's reference embeddings (the original model's embeddings of the reference
    captions) never change: the teacher is frozen. The reference code recomputes them
    every iteration (github.com/Thunderbeee/ZSCL, ``mtil/src/models/finetune.py``); compute
    them here once, before training, and close the loss over the result. The same holds for
    the teacher's features of a fixed, unaugmented reference image set.

    Args:
      embed_fn: ``inputs[i:j] -> [j - i, D]`` features of the frozen teacher (e.g.
        ``lambda x: encode(pretrained_params, x)``); called once per batch, never traced
        into the train step.
      inputs: the reference set, ``[K, ...]``, ``K >= 1``.
      batch_size: rows per call of ``embed_fn``.
      normalize: L2-normalise each embedding (as ZSCL does).

    Returns:
      float32 ``[K, D]``.

    Raises:
      ValueError: for an empty reference set or a non-positive ``batch_size``.

    Example:
      >>> ref = reference_embeddings(lambda x: encode(teacher, x), x_ref)  # doctest: +SKIP

    References:
      Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
      Vision-Language Models", ICCV 2023.
    """
    n = int(np.shape(inputs)[0]) if np.ndim(inputs) else 0
    if n == 0:
        raise ValueError(f"reference_embeddings: the reference set is empty ({np.shape(inputs)=})")
    batch_size = check_int(batch_size, name="batch_size", where="reference_embeddings", low=1)
    out = [jnp.asarray(embed_fn(inputs[i : i + batch_size])) for i in range(0, n, batch_size)]
    emb = jnp.concatenate(out, axis=0).astype(jnp.float32)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"reference_embeddings: embed_fn gave {emb.shape} for {n} inputs")
    return _normalize(emb) if normalize else emb


def zscl_distillation(
    student_features: jax.Array,
    teacher_features: jax.Array,
    ref_embeddings: jax.Array,
    *,
    temperature: float = 2.0,
    logit_scale: float = 100.0,
    image_weight: float = 1.0,
    transposed_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ZSCL's feature distillation: both models' features of reference images, scored
    against the teacher's fixed reference embeddings.

    With ``s``, ``t`` the L2-normalised student / teacher features of a batch of B
    reference images and ``g`` the ``[K, D]`` normalised reference embeddings,
    ``logits_s = scale * s @ g.T`` and ``logits_t = scale * t @ g.T`` (``[B, K]``);
    the loss is ``image_weight * KD(logits_t, logits_s; T)`` (softmax over the K reference
    embeddings) ``+ transposed_weight * KD(logits_t.T, logits_s.T; T)`` (softmax over the
    B images of the batch, ZSCL's "text loss"; it depends on B). The student's logits use
    the teacher's reference embeddings, so only the student's image encoder gets a gradient
    from this loss, as in the reference (github.com/Thunderbeee/ZSCL, issue #1: a design
    choice of the authors).

    Args:
      student_features: ``[B, D]`` features of the model being trained.
      teacher_features: ``[B, D]`` features of the original model (no gradient flows).
      ref_embeddings: ``[K, D]``, from :func:`reference_embeddings` (normalised).
      temperature: KD temperature, 2 in ZSCL.
      logit_scale: multiplies the cosine similarities (CLIP's ``exp(logit_scale)`` = 100).
      image_weight: weight of the term over the reference axis (1; 0.5 with
        ``--weight_adjust``).
      transposed_weight: weight of the transposed term over the batch axis.

    Returns:
      ``(loss, {"kd_image": ..., "kd_transposed": ...})``, float32 scalars.

    Raises:
      ValueError: for a non-positive or non-finite temperature or logit scale, a negative or
        non-finite weight, an empty reference set or batch, or mismatched shapes.

    Example:
      >>> loss, aux = zscl_distillation(encode(p, xr), teacher_feats, ref)  # doctest: +SKIP

    References:
      Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
      Vision-Language Models", ICCV 2023 (``mtil/src/models/finetune.py``).
    """
    where = "zscl_distillation"
    check_scalar(temperature, name="temperature", where=where, low=0.0, low_open=True)
    check_scalar(logit_scale, name="logit_scale", where=where, low=0.0, low_open=True)
    check_scalar(image_weight, name="image_weight", where=where, low=0.0)
    check_scalar(transposed_weight, name="transposed_weight", where=where, low=0.0)
    if ref_embeddings.ndim != 2 or ref_embeddings.shape[0] == 0:
        raise ValueError(
            f"zscl_distillation: the reference set is empty or not [K, D] ({ref_embeddings.shape=})"
        )
    if student_features.shape != teacher_features.shape or student_features.ndim != 2:
        raise ValueError(
            f"zscl_distillation: {student_features.shape=} and {teacher_features.shape=} "
            "must be the same [B, D]"
        )
    if student_features.shape[0] == 0:
        raise ValueError("zscl_distillation: the batch of reference images is empty")
    if student_features.shape[1] != ref_embeddings.shape[1]:
        raise ValueError(
            f"zscl_distillation: feature width {student_features.shape[1]} differs from the "
            f"reference embeddings' {ref_embeddings.shape[1]}"
        )
    g = jax.lax.stop_gradient(ref_embeddings).astype(jnp.float32)
    s = _normalize(student_features)
    t = _normalize(jax.lax.stop_gradient(teacher_features))
    logits_s = logit_scale * s @ g.T
    logits_t = logit_scale * t @ g.T
    kd_image = kd_loss(logits_s, logits_t, temperature=temperature)
    kd_transposed = kd_loss(logits_s.T, logits_t.T, temperature=temperature)
    loss = image_weight * kd_image + transposed_weight * kd_transposed
    return loss, {"kd_image": kd_image, "kd_transposed": kd_transposed}
