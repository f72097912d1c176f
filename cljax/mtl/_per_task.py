"""Per-task gradients of a multi-task loss: stacked for shared parameters, own for heads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax._checks import check_int

__all__ = ["TaskGrads", "head_mask", "merge_parts", "per_task_grads", "split_parts"]

PyTree = Any


class TaskGrads(NamedTuple):
    """Per-task gradients of a multi-task loss.

    Attributes:
      shared: the params tree with a leading task axis T on every shared leaf (row i is
        ``grad_shared L_i``) and ``None`` in place of head leaves.
      heads: the params tree holding, on every head leaf, the gradient of the task that
        owns it (``sum_i grad L_i``, in which only the owner contributes), and ``None`` in
        place of shared leaves.
      losses: ``[T]`` task losses.
      aux: the loss function's auxiliary output (``None`` without ``has_aux``).
    """

    shared: PyTree
    heads: PyTree
    losses: jax.Array
    aux: Any


def head_mask(params: PyTree, head_rules: ct.Rules) -> PyTree:
    """Booleans per leaf: ``True`` for task-specific (head) leaves, by path rules.

    ``head_rules`` are ``(regex, bool)`` pairs, first match wins; unmatched leaves are
    shared. Print :func:`cljax.tree.describe_rules` to see what they select.
    """
    return jax.tree.map(bool, ct.rule_values(params, head_rules, default=False))


def split_parts(tree: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """``(shared, heads)``: two trees of ``tree``'s structure with ``None`` for the other part."""
    shared = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    heads = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    return shared, heads


def merge_parts(shared: PyTree, heads: PyTree) -> PyTree:
    """Inverse of :func:`split_parts`: takes each leaf from whichever part holds it."""
    is_none = lambda x: x is None
    return jax.tree.map(lambda s, h: h if s is None else s, shared, heads, is_leaf=is_none)


def sum_heads(heads: PyTree) -> PyTree:
    """Per-task head gradients ``(T, ...)`` summed over tasks, slice by slice (only the
    owner task's slice is non-zero; see :func:`cljax.tree.sum_slices`)."""
    return jax.tree.map(lambda x: ct.sum_slices(list(x), x.dtype), heads)


def task_map(fn: Callable, xs: Any, task_batch_size: int | None, unroll: bool = False) -> Any:
    """``fn`` over the leading task axis of ``xs``: all at once, or in chunks.

    ``task_batch_size=None`` vectorises over all tasks (``vmap``). Otherwise the tasks run
    ``task_batch_size`` at a time (each chunk vectorised), by ``lax.map`` (a loop, so
    memory is bounded by one chunk), or, with ``unroll``, by a Python loop that places
    every chunk in the graph. Unrolling exists for XLA:CPU, which leaves the weight
    gradients of convolutions inside loop bodies in a layout it runs several times
    slower; unrolled chunks get the fast path but do not bound memory by construction
    (XLA's scheduler decides).
    """
    if task_batch_size is None:
        return jax.vmap(fn)(xs)
    if not unroll:
        return jax.lax.map(fn, xs, batch_size=task_batch_size)
    t = jax.tree.leaves(xs)[0].shape[0]
    chunks = []
    for start in range(0, t, task_batch_size):
        if task_batch_size == 1:
            out = fn(jax.tree.map(lambda x, start=start: x[start], xs))
            chunks.append(jax.tree.map(lambda y: y[None], out))
        else:
            chunk = jax.tree.map(lambda x, start=start: x[start : start + task_batch_size], xs)
            chunks.append(jax.vmap(fn)(chunk))
    return jax.tree.map(lambda *ys: jnp.concatenate(ys), *chunks)


def check_task_batch_size(where: str, task_batch_size: int | None, unroll: bool) -> None:
    """Raises ``ValueError`` naming ``where`` on a bad ``task_batch_size`` / ``unroll`` pair."""
    if task_batch_size is not None:
        check_int(task_batch_size, name="task_batch_size", where=where, low=1)
    if unroll and task_batch_size is None:
        raise ValueError(f"{where}: unroll=True needs a task_batch_size (the chunk to unroll)")


def _check_losses(losses: Any) -> int:
    shape = jnp.shape(losses)
    if len(shape) != 1:
        raise ValueError(f"the loss function must return a [T] vector of task losses, got {shape=}")
    return shape[0]


def per_task_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: Any,
    *args: Any,
    head_rules: ct.Rules = (),
    has_aux: bool = False,
    weights: jax.Array | None = None,
    task_batch_size: int | None = None,
    unroll: bool = False,
) -> TaskGrads:
    """One forward pass and T backward passes (vectorised): the per-task gradients.

    The backward passes are the vector-Jacobian products of ``loss_fn`` with the rows of
    the identity (``diag(weights)`` when given), vectorised with ``vmap`` or, when
    ``task_batch_size`` is set, run ``task_batch_size`` at a time by ``lax.map``.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> losses[T]`` or ``-> (losses, aux)``.
      params: the parameters (any pytree).
      batch: the batch passed to ``loss_fn``.
      *args: further positional arguments of ``loss_fn`` (e.g. BatchNorm statistics).
      head_rules: ``(regex, bool)`` rules marking task-specific leaves (``True``); all
        other leaves are shared. Example: ``[(r"head_\\d+/", True)]``.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      weights: optional ``[T]`` loss weights; gradient i is that of ``weights[i] * L_i``.
      task_batch_size: run the backward passes this many tasks at a time (memory).
      unroll: run those chunks as a Python loop in the graph instead of ``lax.map``:
        XLA:CPU runs the weight gradients of convolutions inside a loop body several
        times slower; unrolled, memory is not bounded by construction.

    Returns:
      A :class:`TaskGrads`.

    Raises:
      ValueError: if ``loss_fn`` does not return a vector, on a bad ``task_batch_size``,
        or ``unroll`` without one.

    Example::

      >>> tg = per_task_grads(loss_fn, params, batch, head_rules=[(r"head_", True)])
      >>> g = cljax.mtl.mgda(tg.shared)

    References:
      Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
      (shared/task-specific split).
    """
    check_task_batch_size("per_task_grads", task_batch_size, unroll)
    f = lambda p: loss_fn(p, batch, *args)
    if has_aux:
        losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
    else:
        (losses, vjp_fn), aux = jax.vjp(f, params), None
    t = _check_losses(losses)
    cot = jnp.eye(t, dtype=losses.dtype)
    if weights is not None:
        cot = cot * jnp.asarray(weights, losses.dtype)[:, None]
    (jac,) = task_map(vjp_fn, cot, task_batch_size, unroll)
    mask = head_mask(params, head_rules)
    shared, heads = split_parts(jac, mask)
    heads = sum_heads(heads)
    return TaskGrads(shared=shared, heads=heads, losses=losses, aux=aux)
