"""Unsupervised objectives for test-time adaptation: prediction entropy and pseudo-labels."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from cljax._checks import check_scalar

__all__ = ["entropy", "entropy_loss", "pseudo_label_loss"]


def entropy(logits: ArrayLike, *, axis: int = -1) -> jax.Array:
    """Shannon entropy (nats) of ``softmax(logits)`` along ``axis``, computed stably.

    ``H = logsumexp(z) - sum(softmax(z) * z)``, in float32 or wider whatever the input dtype.

    Args:
      logits: unnormalised log-probabilities, e.g. ``[batch, classes]``.
      axis: the class axis.

    Returns:
      The entropy of each distribution: ``logits`` without ``axis``.

    Example:
      >>> float(entropy(jnp.zeros(4)))  # uniform over 4 classes: log 4
      1.386...

    References:
      Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021.
    """
    z = jnp.asarray(logits)
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    logp = jax.nn.log_softmax(z, axis=axis)
    return -jnp.sum(jnp.exp(logp) * logp, axis=axis)


def entropy_loss(logits: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    """Mean prediction entropy over a batch: the test-time-adaptation objective of Tent.

    Args:
      logits: ``[batch, classes]``.
      where: optional ``[batch]`` boolean/0-1 weights (padding mask); the mean runs over the
        selected examples (0 when none is selected).

    Returns:
      A scalar (float32 or wider).

    Example:
      >>> loss = entropy_loss(model_logits)  # minimise to sharpen predictions

    References:
      Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021.
      Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic
      Scaling" (aTLAS), NeurIPS 2024, §test-time adaptation.
    """
    h = entropy(logits)
    if where is None:
        return jnp.mean(h)
    w = jnp.asarray(where, h.dtype)
    return jnp.sum(h * w) / jnp.maximum(jnp.sum(w), 1.0)


def pseudo_label_loss(
    weak_logits: ArrayLike,
    strong_logits: ArrayLike,
    *,
    threshold: float = 0.99,
    hard: bool = False,
    normalize: Literal["confident", "batch"] = "confident",
) -> jax.Array:
    """FixMatch-style confidence-thresholded pseudo-label loss.

    Pseudo-labels come from the predictions on a weakly augmented view (no gradient flows
    through them); the cross-entropy is taken on a strongly augmented view of the same
    examples, only where the weak view's top probability exceeds ``threshold``.

    The defaults follow aTLAS's unsupervised FixMatch (``learn_ufm.py``): *soft* targets
    (the weak view's softmax; its "sharpening" by 0.5 followed by renormalisation is the
    identity) and a mean over the confident examples. ``hard=True, normalize="batch"``
    gives the original FixMatch (one-hot targets, mean over the whole batch).

    Args:
      weak_logits: ``[batch, classes]`` logits of the weak view (stop-gradient is applied).
      strong_logits: ``[batch, classes]`` logits of the strong view.
      threshold: confidence threshold in [0, 1).
      hard: one-hot (argmax) pseudo-labels instead of the soft distribution.
      normalize: ``"confident"`` divides by the number of confident examples (0 loss when
        there is none), ``"batch"`` by the batch size.

    Returns:
      A scalar loss (float32 or wider).

    Raises:
      ValueError: on a threshold outside [0, 1), an unknown ``normalize`` or mismatched shapes.

    Example:
      >>> loss = pseudo_label_loss(logits_fn(params, x_weak), logits_fn(params, x_strong))

    References:
      Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
      Confidence", NeurIPS 2020. Zhang et al., aTLAS, NeurIPS 2024 (``src/learn_ufm.py``).
    """
    check_scalar(
        threshold, name="threshold", where="pseudo_label_loss", low=0.0, high=1.0, high_open=True
    )
    if normalize not in ("confident", "batch"):
        raise ValueError(f"{normalize=} must be 'confident' or 'batch'")
    weak = jnp.asarray(weak_logits)
    strong = jnp.asarray(strong_logits)
    if weak.shape != strong.shape or weak.ndim != 2:
        raise ValueError(
            f"weak_logits {weak.shape} and strong_logits {strong.shape} must both be "
            "[batch, classes]"
        )
    dt = jnp.promote_types(jnp.promote_types(weak.dtype, strong.dtype), jnp.float32)
    probs = jax.lax.stop_gradient(jax.nn.softmax(weak.astype(dt), axis=-1))
    conf = jnp.max(probs, axis=-1)
    mask = (conf > threshold).astype(dt)
    if hard:
        targets = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=dt)
    else:
        targets = probs
    ce = -jnp.sum(targets * jax.nn.log_softmax(strong.astype(dt), axis=-1), axis=-1)
    denom = jnp.maximum(jnp.sum(mask), 1.0) if normalize == "confident" else ce.shape[0]
    return jnp.sum(ce * mask) / denom
