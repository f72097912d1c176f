"""Rep-MTL: regularising the task saliency of the shared representation.

Rep-MTL (Wang, Li & Xu, ICCV 2025) does not change the optimiser: it adds two penalties to
the task losses, both functions of the *task saliency* ``S_t = dL_t/dZ``, the gradient of
task t's loss with respect to the shared representation ``Z`` (the trunk's output, the
heads' input). ``S_t`` is how task t would move the representation; the penalties act on
it through second-order gradients:

* task-specific saliency regulation (TSR): an entropy penalty on how each element's
  saliency is spread over the tasks, low when every element is salient for one task,
  so task-specific patterns survive the shared update (against negative transfer);
* cross-task saliency alignment (CSA): a sample-wise contrastive (InfoNCE) term that
  makes the saliencies of one sample agree across tasks and differ from other samples',
  so the tasks share what they can.

The paper's code is not public (the reference repository holds a README), so the
normalisations below are choices made here, listed in each docstring and in the guide:
TSR normalises saliency *magnitudes* over the tasks (L1) and weights each element's entropy
by its share of the total saliency mass; CSA compares cosine similarities. Both penalties
are therefore invariant to a positive rescaling of the saliency, so the loss's reduction
(batch mean or sum) does not matter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from cljax._checks import check_scalar

__all__ = [
    "rep_mtl_loss_fn",
    "rep_mtl_regularizer",
    "saliency_alignment",
    "saliency_entropy",
    "task_saliency",
]


def _check_saliency(saliency: ArrayLike, where: str) -> jax.Array:
    s = jnp.asarray(saliency)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise ValueError(f"{where}: saliency must be floating; got dtype {s.dtype}")
    if s.ndim < 3:
        raise ValueError(
            f"{where}: saliency must be [T, B, *features] (at least 3 axes); got shape {s.shape}"
        )
    if s.shape[0] < 2:
        raise ValueError(f"{where}: needs T >= 2 tasks; got T={s.shape[0]} (shape {s.shape})")
    if s.shape[1] < 1 or s.size == 0:
        raise ValueError(f"{where}: saliency is empty (shape {s.shape})")
    return s


def _feature_axis(channel_axis: int | None, ndim: int, where: str) -> int | None:
    """``channel_axis`` of a representation ``[B, *features]`` as an axis of the saliency."""
    if channel_axis is None:
        return None
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
        raise ValueError(f"{where}: {channel_axis=} must be an int or None")
    zdim = ndim - 1  # the representation's rank
    ax = channel_axis + zdim if channel_axis < 0 else channel_axis
    if not 1 <= ax < zdim:
        raise ValueError(
            f"{where}: {channel_axis=} must name a feature axis of the representation "
            f"(rank {zdim}: axes 1..{zdim - 1} or -{zdim - 1}..-1, not the batch axis 0)"
        )
    return ax + 1


def task_saliency(
    head_losses: Callable[[jax.Array], Any], z: ArrayLike, *, has_aux: bool = False
) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, Any]:
    """The task losses and their saliencies ``S[t] = dL_t / dz``, stacked on a task axis.

    One forward pass of ``head_losses`` and T vectorised backward passes to ``z`` (not to
    any parameter). The saliency stays differentiable: a penalty on it differentiates, by
    a second-order pass, into whatever ``z`` and ``head_losses`` depend on (the trunk
    through ``z``, the heads through their closure).

    Args:
      head_losses: ``head_losses(z) -> losses[T]`` (or ``(losses, aux)`` with ``has_aux``):
        the task losses as a function of the shared representation alone, the heads'
        parameters and the labels closed over.
      z: the shared representation ``[B, *features]``.
      has_aux: whether ``head_losses`` returns ``(losses, aux)``.

    Returns:
      ``(losses, saliency)``, or ``(losses, saliency, aux)`` with ``has_aux``:
      ``losses`` is ``[T]``, ``saliency`` is ``[T, *z.shape]`` in ``z``'s dtype.

    Raises:
      ValueError: if ``z`` has no batch axis or ``losses`` is not a vector.

    Example::

      >>> losses, s = task_saliency(lambda z: heads_loss(params, z, batch), z)

    References:
      Wang, Li & Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency
      for Multi-Task Learning", ICCV 2025 (arXiv 2507.21049).
    """
    losses, saliency, aux = _saliency(head_losses, z, has_aux)
    return (losses, saliency, aux) if has_aux else (losses, saliency)


def _saliency(
    head_losses: Callable[[jax.Array], Any], z: ArrayLike, has_aux: bool
) -> tuple[jax.Array, jax.Array, Any]:
    z = jnp.asarray(z)
    if z.ndim < 2:
        raise ValueError(f"task_saliency: z must be [B, *features]; got shape {z.shape}")
    if has_aux:
        losses, vjp_fn, aux = jax.vjp(head_losses, z, has_aux=True)
    else:
        losses, vjp_fn = jax.vjp(head_losses, z)
        aux = None
    if jnp.ndim(losses) != 1:
        raise ValueError(
            f"task_saliency: head_losses must return a vector of T losses; got shape "
            f"{jnp.shape(losses)}"
        )
    t = losses.shape[0]
    (saliency,) = jax.vmap(vjp_fn)(jnp.eye(t, dtype=losses.dtype))
    return losses, saliency, aux


def saliency_entropy(
    saliency: ArrayLike, *, channel_axis: int | None = None, eps: float = 1e-12
) -> jax.Array:
    """Rep-MTL's task-specific saliency regulation (TSR): how mixed the tasks' saliency is.

    With magnitudes ``m[t, e] = |S[t, e]|`` at every element ``e`` of the representation
    (sample, position, channel; summed over ``channel_axis`` first if one is given, the
    paper's channel-aggregated spatial saliency), each element's task distribution is
    ``p[t, e] = m[t, e] / sum_t m[t, e]`` and its normalised entropy
    ``h[e] = -sum_t p log p / log T`` lies in [0, 1]: 0 when one task alone moves that
    element, 1 when all tasks move it equally. The penalty is the mean of ``h`` weighted
    by each element's share of the total mass, ``w[e] = sum_t m[t, e] / sum m``.
    Minimising it pushes every element of the representation towards one owner task.

    Choices of this implementation (the paper's code is not public): the L1 normalisation
    of magnitudes (scale-free, unlike a softmax over raw gradients), the mass weighting
    (an element with no saliency has no defined distribution and gets no weight; with a
    uniform mean the gradient would grow like ``1/m`` there), the ``log T`` normalisation.

    Args:
      saliency: ``[T, B, *features]`` task saliencies (:func:`task_saliency`), T >= 2.
      channel_axis: an axis of the representation ``[B, *features]`` to sum magnitudes
        over before the task distribution (e.g. ``-1`` for NHWC maps), or ``None``.
      eps: guards divisions by zero mass; a zero saliency gives 0.

    Returns:
      A float32 (or float64) scalar in [0, 1].

    Raises:
      ValueError: on fewer than 3 axes, T < 2, a bad ``channel_axis`` or ``eps``.

    Example::

      >>> saliency_entropy(jnp.stack([jnp.ones((4, 8)), jnp.zeros((4, 8))]))  # 0.0
      >>> saliency_entropy(jnp.ones((2, 4, 8)))  # 1.0

    References:
      Wang, Li & Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency
      for Multi-Task Learning", ICCV 2025 (arXiv 2507.21049), task-specific saliency
      regulation.
    """
    where = "saliency_entropy"
    s = _check_saliency(saliency, where)
    check_scalar(eps, name="eps", where=where, low=0.0, low_open=True)
    ax = _feature_axis(channel_axis, s.ndim, where)
    dt = jnp.promote_types(s.dtype, jnp.float32)
    m = jnp.abs(s.astype(dt))
    if ax is not None:
        m = m.sum(axis=ax)
    t = m.shape[0]
    mass = m.sum(axis=0)  # [B, ...]
    p = m / jnp.maximum(mass, eps)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    h = -plogp.sum(axis=0) / jnp.log(jnp.asarray(t, dt))
    return (h * mass).sum() / jnp.maximum(mass.sum(), eps)


def saliency_alignment(
    saliency: ArrayLike, *, temperature: float = 0.1, eps: float = 1e-12
) -> jax.Array:
    """Rep-MTL's cross-task saliency alignment (CSA): a sample-wise InfoNCE across tasks.

    Each sample's saliency for task t, flattened over the features, is normalised to a unit
    vector ``u[t, b]``. For every ordered pair of tasks ``(j, k)``, ``j != k``, sample b's
    saliency for task j is the anchor, its saliency for task k the positive, and the other
    samples' saliencies for task k the negatives:
    ``l_jk(b) = -log softmax_b'(<u[j, b], u[k, b']> / temperature)[b]``. The penalty is
    the mean over samples and ordered pairs. Minimising it aligns the directions in which
    the tasks move each sample's representation while keeping samples apart.

    Choices of this implementation (the paper's code is not public): signed saliencies
    (directions of update, not magnitudes), cosine similarity (scale-free), the average
    over all ordered task pairs (symmetric in the tasks). A sample whose saliency is zero
    for a task has similarity 0 to everything for that task.

    Args:
      saliency: ``[T, B, *features]`` task saliencies (:func:`task_saliency`), T >= 2.
      temperature: the InfoNCE temperature, > 0.
      eps: guards the normalisation of zero saliencies.

    Returns:
      A scalar >= 0; at best ``log(1 + (B - 1) exp(-2 / temperature))`` (positives aligned,
      negatives opposite), ``log B`` when all similarities are equal.

    Raises:
      ValueError: on fewer than 3 axes, T < 2, a non-positive or non-finite
        ``temperature`` or ``eps``.

    Example::

      >>> s = jnp.stack([u, u])  # the same per-sample saliency for both tasks
      >>> saliency_alignment(s, temperature=0.1)

    References:
      Wang, Li & Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency
      for Multi-Task Learning", ICCV 2025 (arXiv 2507.21049), cross-task saliency
      alignment; van den Oord et al., "Representation Learning with Contrastive Predictive
      Coding", arXiv 1807.03748 (InfoNCE).
    """
    where = "saliency_alignment"
    s = _check_saliency(saliency, where)
    check_scalar(temperature, name="temperature", where=where, low=0.0, low_open=True)
    check_scalar(eps, name="eps", where=where, low=0.0, low_open=True)
    dt = jnp.promote_types(s.dtype, jnp.float32)
    t, b = s.shape[:2]
    v = s.astype(dt).reshape(t, b, -1)
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    nonzero = sq > 0  # a zero saliency gets u = 0 and a zero (not NaN) gradient
    norm = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    u = jnp.where(nonzero, v / jnp.maximum(norm, eps), 0.0)
    logits = jnp.einsum("jbd,kcd->jkbc", u, u) / temperature  # [T, T, B, B]
    labels = jnp.broadcast_to(jnp.arange(b), (t, t, b))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [T, T, B]
    off = 1.0 - jnp.eye(t, dtype=dt)
    return jnp.sum(ce.mean(-1) * off) / (t * (t - 1))


def _is_zero(weight: Any) -> bool:
    """A weight known to be 0 at trace time (a Python or numpy number, not a tracer)."""
    return isinstance(weight, int | float | np.number) and weight == 0


def _check_weights(where: str, tsr_weight, csa_weight, temperature) -> None:
    check_scalar(tsr_weight, name="tsr_weight", where=where, low=0.0)
    check_scalar(csa_weight, name="csa_weight", where=where, low=0.0)
    check_scalar(temperature, name="temperature", where=where, low=0.0, low_open=True)


def rep_mtl_regularizer(
    saliency: ArrayLike,
    *,
    tsr_weight: float = 1.0,
    csa_weight: float = 1.0,
    temperature: float = 0.1,
    channel_axis: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rep-MTL's penalty on task saliencies: ``tsr_weight * TSR + csa_weight * CSA``.

    TSR is :func:`saliency_entropy`, CSA is :func:`saliency_alignment`; a weight that is
    0 at trace time (a number, not a traced array) skips its term (it is not computed).

    Args:
      saliency: ``[T, B, *features]`` task saliencies (:func:`task_saliency`), T >= 2.
      tsr_weight: weight of the entropy term, >= 0.
      csa_weight: weight of the alignment term, >= 0.
      temperature: CSA's temperature, > 0.
      channel_axis: TSR's channel axis of the representation (see
        :func:`saliency_entropy`).

    Returns:
      ``(penalty, {"tsr": ..., "csa": ...})``, the unweighted terms in the dict (0 for a
      skipped one).

    Raises:
      ValueError: on a negative or non-finite weight, a bad temperature or saliency.

    Example::

      >>> penalty, terms = rep_mtl_regularizer(s, tsr_weight=0.1, csa_weight=0.1)
    """
    where = "rep_mtl_regularizer"
    _check_weights(where, tsr_weight, csa_weight, temperature)
    s = _check_saliency(saliency, where)
    dt = jnp.promote_types(s.dtype, jnp.float32)
    zero = jnp.zeros((), dt)
    tsr = zero if _is_zero(tsr_weight) else saliency_entropy(s, channel_axis=channel_axis)
    csa = zero if _is_zero(csa_weight) else saliency_alignment(s, temperature=temperature)
    return tsr_weight * tsr + csa_weight * csa, {"tsr": tsr, "csa": csa}


def rep_mtl_loss_fn(
    features_fn: Callable[..., Any],
    head_losses_fn: Callable[..., jax.Array],
    *,
    tsr_weight: float = 1.0,
    csa_weight: float = 1.0,
    temperature: float = 0.1,
    channel_axis: int | None = None,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """A multi-task loss with Rep-MTL's penalty, for any aggregator.

    ``loss_fn(params, batch, *args) -> losses[T]`` computes ``z = features_fn(params,
    batch, *args)``, the task losses ``L_t = head_losses_fn(params, z, batch, *args)[t]``
    with their saliencies (:func:`task_saliency`), and returns
    ``L_t + R / T`` with ``R`` the :func:`rep_mtl_regularizer`. Equal weighting at sum
    scale then minimises ``sum_t L_t + tsr_weight * TSR + csa_weight * CSA``, the paper's
    objective; every aggregator of :mod:`cljax.mtl` takes it through
    :func:`cljax.mtl.task_grad_fn` (or :func:`cljax.mtl.mtl_grad_fn`) and keeps the
    penalty's weight relative to the task losses whatever its scale convention (mean or
    sum). Sharing ``R`` equally is a choice of this implementation: the penalty couples
    the tasks and has no per-task split. Its gradient is second order (through the
    saliency) and reaches the trunk and the heads alike.

    Args:
      features_fn: ``features_fn(params, batch, *args) -> z`` (the trunk), or ``(z,
        aux)`` with ``has_aux`` (e.g. updated batch statistics).
      head_losses_fn: ``head_losses_fn(params, z, batch, *args) -> losses[T]``.
      tsr_weight: weight of the task-specific saliency regulation, >= 0.
      csa_weight: weight of the cross-task saliency alignment, >= 0.
      temperature: the alignment's temperature, > 0.
      channel_axis: TSR's channel axis of ``z`` (see :func:`saliency_entropy`).
      has_aux: whether ``features_fn`` returns ``(z, aux)``; the loss then returns
        ``(losses, aux)`` (the ``has_aux`` protocol of :func:`cljax.mtl.task_grad_fn`).

    Returns:
      The loss function.

    Raises:
      ValueError: now, on a negative or non-finite weight or a non-positive temperature;
        at trace time, on T < 2 or a bad ``channel_axis``.

    Example::

      >>> loss_fn = rep_mtl_loss_fn(trunk_fn, heads_fn, tsr_weight=0.1, csa_weight=0.1)
      >>> tx = optax.chain(cljax.mtl.aggregate(cljax.mtl.pcgrad, head_rules=heads),
      ...                  optax.adam(1e-3))
      >>> stacked, info = cljax.mtl.task_grad_fn(loss_fn)(params, batch)

    References:
      Wang, Li & Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency
      for Multi-Task Learning", ICCV 2025 (arXiv 2507.21049); github.com/Jacky1128/Rep-MTL.
    """
    where = "rep_mtl_loss_fn"
    _check_weights(where, tsr_weight, csa_weight, temperature)
    if not callable(features_fn):
        raise TypeError(f"{where}: {features_fn=} is not callable")
    if not callable(head_losses_fn):
        raise TypeError(f"{where}: {head_losses_fn=} is not callable")

    def loss_fn(params, batch, *args):
        out = features_fn(params, batch, *args)
        z, aux = out if has_aux else (out, None)
        losses, s, _ = _saliency(lambda z_: head_losses_fn(params, z_, batch, *args), z, False)
        t = losses.shape[0]
        if t < 2:
            raise ValueError(f"{where}: needs T >= 2 tasks; head_losses_fn returned T={t}")
        reg, _ = rep_mtl_regularizer(
            s,
            tsr_weight=tsr_weight,
            csa_weight=csa_weight,
            temperature=temperature,
            channel_axis=channel_axis,
        )
        out_losses = losses + (reg / t).astype(losses.dtype)
        return (out_losses, aux) if has_aux else out_losses

    return loss_fn
