"""Shared plumbing of the gradient aggregators: validation, the Gram matrix, weighted sums.

Every aggregator of :mod:`cljax.mtl` takes a *stacked* gradient tree (each leaf has a
leading task axis of size T) or a Python sequence of T trees. Most of them
only need the T×T Gram matrix ``G[i, j] = <g_i, g_j>`` of the task gradients, taken as
*global* dot products over all leaves (the PCGrad / CAGrad / MGDA references flatten all
shared parameters into one vector), and return ``sum_i w_i g_i`` for task weights ``w``.
This module computes ``G`` once, in float32 (float64 if the gradients are), with one pass
over the gradients, and forms the weighted sum with a second pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cljax import tree as ct

__all__ = ["combine", "gram", "num_tasks", "stacked_grads"]

PyTree = Any


def stacked_grads(task_grads: Any, *, name: str, min_tasks: int = 1) -> tuple[PyTree, int]:
    """Validates per-task gradients and returns ``(stacked_tree, T)``.

    Accepts a stacked tree or a list/tuple of trees (stacked here). Shapes are static, so
    this runs at trace time under ``jit``.

    Raises:
      ValueError: if the trees mismatch (naming the first differing path), the leaves
        disagree on T, a leaf is not floating point, ``T < min_tasks``, or (concrete
        gradients only: an eager call) a task's gradient holds NaN or Inf.
      TypeError: if a leaf is not an array.
    """
    try:
        stacked = ct.as_stacked(task_grads, name=f"{name}: task_grads")
        t = ct.num_stacked(stacked)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(name) else f"{name}: {msg}") from None
    for p, x in ct.leaves_with_paths(stacked):
        if not ct.is_float(x):
            raise ValueError(f"{name}: leaf {p!r} has dtype {jnp.result_type(x)}, expected float")
    if t < min_tasks:
        raise ValueError(
            f"{name}: got T={t} task gradients; this aggregator needs T >= {min_tasks}"
        )
    _check_finite_tasks(stacked, t, name)
    return stacked, t


def _check_finite_tasks(stacked: PyTree, t: int, name: str) -> None:
    """With concrete gradients (an eager call), raises on the first task and leaf holding
    NaN/Inf; traced ones (inside a step) are the step's to check (its ``nonfinite``)."""
    pl = ct.leaves_with_paths(stacked)
    if any(isinstance(x, jax.core.Tracer) for _, x in pl):
        return
    ok = jax.device_get([jnp.isfinite(x).reshape(t, -1).all(axis=1) for _, x in pl])
    for (p, _), per_task in zip(pl, ok, strict=True):
        if not per_task.all():
            k = int((~per_task).argmax())
            at = f" at path {p!r}" if p else ""
            raise ValueError(
                f"{name}: task_grads[{k}] holds NaN or Inf{at}; an aggregator would spread "
                "it to every task's update"
            )


def num_tasks(task_grads: Any) -> int:
    """T, the size of the leading task axis (validates like :func:`stacked_grads`)."""
    return stacked_grads(task_grads, name="num_tasks")[1]


def _dtype(stacked: PyTree) -> jnp.dtype:
    dts = {ct.accum_dtype(x.dtype) for x in jax.tree.leaves(stacked)}
    return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dts else jnp.dtype(jnp.float32)


def gram(task_grads: Any) -> jax.Array:
    """The T×T Gram matrix of global dot products, accumulated in float32.

    ``G[i, j] = sum over leaves of <g_i[leaf], g_j[leaf]>``; float64 if the gradients are.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T trees.

    Returns:
      ``[T, T]`` symmetric positive semi-definite matrix.

    Example::

      >>> g = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
      >>> gram(g)  # [[1, 1], [1, 2]]
    """
    stacked, t = stacked_grads(task_grads, name="gram")
    dt = _dtype(stacked)
    out = jnp.zeros((t, t), dt)
    for x in jax.tree.leaves(stacked):
        m = x.reshape(t, -1).astype(dt)
        out = out + jnp.dot(m, m.T, precision=jax.lax.Precision.HIGHEST)
    return out


def combine(task_grads: Any, weights: jax.Array) -> PyTree:
    """``sum_i weights[i] * g_i`` leaf by leaf, accumulated in float32, cast back per leaf.

    Args:
      task_grads: stacked tree (leading axis T) or a sequence of T trees.
      weights: ``[T]`` task weights.

    Returns:
      One gradient tree of the unstacked structure and the leaves' dtypes.

    Raises:
      ValueError: if ``weights`` is not of shape ``[T]``.
    """
    stacked, t = stacked_grads(task_grads, name="combine")
    weights = jnp.asarray(weights)
    if weights.shape != (t,):
        raise ValueError(f"combine: weights.shape={weights.shape} must be ({t},) for T={t} tasks")
    dt = _dtype(stacked)
    w = weights.astype(dt)

    def leaf(x):  # slice by slice: see cljax.tree.sum_slices (not a tensordot)
        return ct.sum_slices([w[i] * x[i].astype(dt) for i in range(t)], dt).astype(x.dtype)

    return jax.tree.map(leaf, stacked)
