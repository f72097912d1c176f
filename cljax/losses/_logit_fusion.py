"""Logit arithmetic and dynamic logit fusion: small experts steer a large model in output space.

This is the output-space counterpart of task arithmetic: ``expert - base`` is a task vector of
logits rather than of weights, added to a larger model that shares the vocabulary but not the
architecture. It lives with the losses, not in ``cljax.merging``, because it acts on model
outputs (per position, at every decoding step) and shares their softmax/KL machinery, while
``cljax.merging`` holds pure functions from parameter pytrees to a parameter pytree.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dynamic_logit_fusion", "logit_arithmetic"]


def _stack(experts, like: jax.Array, name: str) -> jax.Array:
    if isinstance(experts, Sequence) and not isinstance(experts, jax.Array):
        if not experts:
            raise ValueError(f"{name}: experts is empty")
        experts = jnp.stack([jnp.asarray(e) for e in experts])
    experts = jnp.asarray(experts)
    if experts.ndim < 1 or experts.shape[1:] != jnp.shape(like) or experts.shape[0] == 0:
        raise ValueError(
            f"{name}: experts {experts.shape} must be [T, *{tuple(jnp.shape(like))}] "
            "(a stack of logits shaped like the base's)"
        )
    return experts


def _check(large, base, name):
    if jnp.shape(large) != jnp.shape(base) or jnp.ndim(large) < 1:
        raise ValueError(
            f"{name}: large {jnp.shape(large)} and base {jnp.shape(base)} logits must have one "
            "shape [..., V]"
        )


def _check_finite(value, name: str, where: str) -> None:
    """Rejects a concrete hyperparameter array holding NaN or infinity (traced ones pass)."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        if arr.dtype.kind != "V":  # bfloat16 is numpy's void-like extension type
            raise ValueError(f"{where}: {name} must be real numbers; got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr.astype(np.float64))):
        raise ValueError(f"{where}: {name}={arr.tolist()!r} must be finite")


def _kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """``KL(softmax(p) || softmax(q))`` over the last axis."""
    logp = jax.nn.log_softmax(p_logits, axis=-1)
    logq = jax.nn.log_softmax(q_logits, axis=-1)
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def logit_arithmetic(
    large: jax.Array, base: jax.Array, experts, alpha: jax.typing.ArrayLike
) -> jax.Array:
    """``large + sum_t alpha_t * (expert_t - base)`` on logits.

    Proxy-tuning / emulated fine-tuning generalised to several experts: the small base model
    and its fine-tuned experts share the large model's vocabulary; each expert's shift of the
    small model's logits is added to the large model's logits.

    Args:
      large: ``[..., V]`` logits of the large (untuned) model.
      base: ``[..., V]`` logits of the small untuned model.
      experts: ``[T, ..., V]`` stacked logits of the small experts, or a sequence of T arrays.
      alpha: a scalar (all experts), ``[T]`` (one per expert) or ``[T, ...]`` (one per expert
        and position, as :func:`dynamic_logit_fusion` returns).

    Returns:
      ``[..., V]`` fused logits, computed in float32, in the dtype of ``large``.

    Raises:
      ValueError: if the shapes disagree, or a concrete ``alpha`` holds NaN or infinity.

    Example::

      fused = logit_arithmetic(large_logits, small_logits, [math_logits, code_logits], [1.0, 0.5])

    References:
      Fan, Lu, Wei, Tian, Qu, Chen & Cheng, "On Giant's Shoulders: Effortless Weak to Strong by
      Dynamic Logits Fusion", NeurIPS 2024 (Eq. 2 and its multi-task form); Liu et al.,
      "Tuning Language Models by Proxy", 2024.
    """
    name = "logit_arithmetic"
    _check(large, base, name)
    experts = _stack(experts, base, name)
    _check_finite(alpha, "alpha", name)
    a = jnp.asarray(alpha, jnp.float32)
    t = experts.shape[0]
    if a.ndim == 0:
        a = jnp.broadcast_to(a, (t,))
    if a.shape[0] != t or a.ndim > experts.ndim - 1:
        raise ValueError(
            f"{name}: alpha {a.shape} must be a scalar, [{t}] or [{t}, ...] within "
            f"{experts.shape[:-1]}"
        )
    a = a.reshape(a.shape + (1,) * (experts.ndim - a.ndim))
    delta = experts.astype(jnp.float32) - jnp.asarray(base, jnp.float32)[None]
    out = jnp.asarray(large, jnp.float32) + jnp.sum(a * delta, axis=0)
    return out.astype(jnp.result_type(large))


def dynamic_logit_fusion(
    large: jax.Array,
    base: jax.Array,
    experts,
    *,
    grid: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Logit arithmetic with the expert weights chosen per position by KL matching.

    At every position (decoding step) the weights ``alpha = (alpha_1..alpha_T)`` are the point
    of the grid (every expert takes every grid value: ``len(grid) ** T`` candidates) that
    minimises

        ``sum_t (KL(p_alpha || p_large) - KL(p_expert_t || p_base)) ** 2``

    where ``p_alpha = softmax(logit_arithmetic(large, base, experts, alpha))``: the fused
    large model should move away from the large model as far as each small expert moved away
    from the small base model. With one expert and ``large == base`` the fused model equals
    the expert at ``alpha = 1`` and the objective is 0 there (and only there on ``alpha >=
    0``, since ``KL(p_alpha || p_base)`` grows with ``alpha``). Candidates are scanned one at
    a time (memory of one fused logit tensor, not of the whole grid); ties go to the first
    candidate in grid order (the first expert's value varies slowest).

    Which details come from where: the official code was not public when this was written
    (the authors' repository held only a README), so the objective follows the paper's
    description: per-step weights learned through a KL-divergence constrained problem that
    asks the fused large model's shift from the large model to match the small expert's
    shift from the small model, solved by search. The KL direction (fused || large, expert
    || base), the squared-difference sum over experts and the default grid are this
    implementation's reading of it.

    Args:
      large: ``[..., V]`` logits of the large model.
      base: ``[..., V]`` logits of the small base model.
      experts: ``[T, ..., V]`` stacked logits of the small experts, or a sequence of arrays.
      grid: 1-D candidate values of each ``alpha_t``; default ``0, 0.1, ..., 2``.

    Returns:
      ``(fused, alpha)``: ``[..., V]`` fused logits (dtype of ``large``) and ``[T, ...]``
      float32 weights per expert and position.

    Raises:
      ValueError: on mismatched shapes, or an empty, non-1-D or non-finite grid.

    Example::

      fused, alpha = dynamic_logit_fusion(large_logits, small_logits, expert_logits)
      next_token = jnp.argmax(fused, axis=-1)

    References:
      Fan, Lu, Wei, Tian, Qu, Chen & Cheng, "On Giant's Shoulders: Effortless Weak to Strong by
      Dynamic Logits Fusion", NeurIPS 2024 (Section 3); https://github.com/Facico/Dynamic-Logit-Fusion.
    """
    name = "dynamic_logit_fusion"
    _check(large, base, name)
    experts = _stack(experts, base, name)
    g = jnp.linspace(0.0, 2.0, 21) if grid is None else jnp.asarray(grid, jnp.float32)
    if g.ndim != 1 or g.shape[0] == 0:
        raise ValueError(f"{name}: grid {g.shape} must be a non-empty 1-D array")
    if grid is not None:
        _check_finite(grid, "grid", name)
    t = experts.shape[0]
    combos = jnp.stack(jnp.meshgrid(*([g] * t), indexing="ij"), axis=-1).reshape(-1, t)
    large32 = jnp.asarray(large, jnp.float32)
    base32 = jnp.asarray(base, jnp.float32)
    delta = experts.astype(jnp.float32) - base32[None]
    target = jax.vmap(lambda e: _kl(e, base32))(experts.astype(jnp.float32))  # [T, ...]

    def body(carry, xs):
        best, best_i = carry
        i, a = xs
        kl = _kl(large32 + jnp.tensordot(a, delta, axes=1), large32)
        j = jnp.sum((kl[None] - target) ** 2, axis=0)
        better = j < best
        return (jnp.where(better, j, best), jnp.where(better, i, best_i)), None

    lead = large32.shape[:-1]
    init = (jnp.full(lead, jnp.inf, jnp.float32), jnp.zeros(lead, jnp.int32))
    idx = jnp.arange(combos.shape[0], dtype=jnp.int32)
    (_, best_i), _ = jax.lax.scan(body, init, (idx, combos))
    alpha = jnp.moveaxis(combos[best_i], -1, 0)  # [T, ...]
    return logit_arithmetic(large, base, experts, alpha), alpha
