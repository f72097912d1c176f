"""SAM and ASAM gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax._checks import check_scalar

__all__ = ["sam_gradient", "sam_perturbation"]

PyTree = Any


def _check_rho(rho: float, where: str) -> None:
    check_scalar(rho, name="rho", where=where, low=0.0)


def _sq_norm(grads: PyTree, params: PyTree, adaptive: bool) -> jax.Array:
    def leaf(g, w):
        g = g.astype(jnp.float32) if g.dtype != jnp.float64 else g
        a = jnp.abs(w).astype(g.dtype) * g if adaptive else g
        return jnp.sum(a * a)

    return sum(jax.tree.leaves(jax.tree.map(leaf, grads, params)), jnp.zeros((), jnp.float32))


def sam_perturbation(
    grads: PyTree, params: PyTree, *, rho: float, adaptive: bool = False, eps: float = 1e-12
) -> PyTree:
    """``eps = rho * a * g / ||a' * g||`` (SAM: ``a = a' = 1``; ASAM: ``a = w^2``, ``a' = |w|``).

    The norm is global over all leaves of ``grads`` (accumulated in float32).

    Args:
      grads: the gradient at ``params``.
      params: the parameters (the ASAM scale).
      rho: radius, ``>= 0``.
      adaptive: ASAM (Kwon et al., ICML 2021: the square in the numerator, the absolute
        value in the denominator, as github.com/VietHoang1512/FS-MTL).
      eps: added to the norm.

    Returns:
      The perturbation, a tree like ``params``.

    Raises:
      ValueError: if ``rho`` is not a finite real ``>= 0``, or ``grads`` and ``params``
        differ in structure or shapes (naming the first differing path).
      TypeError: if a leaf is not an array.
    """
    _check_rho(rho, "sam_perturbation")
    ct.check_same_structure(params, grads, names=("params", "grads"))
    scale = rho / (jnp.sqrt(_sq_norm(grads, params, adaptive)) + eps)

    def leaf(g, w):
        e = (w * w).astype(g.dtype) * g if adaptive else g
        return (e * scale.astype(g.dtype)).astype(w.dtype)

    return jax.tree.map(leaf, grads, params)


def sam_gradient(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: Any,
    *args: Any,
    rho: float,
    adaptive: bool = False,
    has_aux: bool = False,
    eps: float = 1e-12,
) -> tuple[PyTree, dict[str, Any]]:
    """The SAM (or ASAM) gradient: the gradient at the worst-case point of a ``rho``-ball.

    Computes ``g = grad L(w)``, the perturbation ``e = rho * a * g / ||a' * g||``
    (:func:`sam_perturbation`) and returns ``grad L(w + e)``. Two forward and two
    backward passes. With ``has_aux`` the auxiliary output of the *clean* pass is
    returned (BatchNorm statistics update only on the clean pass, as in the F-MTL
    reference, github.com/VietHoang1512/FS-MTL).

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> loss`` (scalar) or ``(loss, aux)``.
      params: the parameters.
      batch: the batch.
      *args: further positional arguments of ``loss_fn``.
      rho: radius of the neighbourhood, ``>= 0`` (``0`` gives the plain gradient).
      adaptive: ASAM's scale-invariant perturbation ``w^2 g / || |w| g ||``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      eps: added to the gradient norm.

    Returns:
      ``(grads, info)``: the SAM gradient and ``{"loss": clean loss, "aux": clean aux}``.

    Raises:
      ValueError: if ``rho`` is not a finite real ``>= 0``.

    Example::

      >>> grads, info = sam_gradient(loss_fn, params, batch, rho=0.05)

    References:
      Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
      Generalization", ICLR 2021. Kwon et al., "ASAM: Adaptive Sharpness-Aware
      Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.
    """
    _check_rho(rho, "sam_gradient")
    f = lambda p: loss_fn(p, batch, *args)
    (out, grads) = jax.value_and_grad(f, has_aux=has_aux)(params)
    loss, aux = out if has_aux else (out, None)
    e = sam_perturbation(grads, params, rho=rho, adaptive=adaptive, eps=eps)
    perturbed = jax.tree.map(lambda w, d: w + d, params, e)
    g_sam = jax.grad(f, has_aux=has_aux)(perturbed)
    if has_aux:
        g_sam = g_sam[0]
    return g_sam, {"loss": loss, "aux": aux}
