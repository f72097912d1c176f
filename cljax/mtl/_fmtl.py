"""F-MTL: per-task sharpness-aware gradients, aggregated separately for loss and flatness."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax._checks import check_scalar
from cljax.mtl._aggregate import FMTLGrads
from cljax.mtl._linear import linear
from cljax.mtl._per_task import (
    _check_losses,
    check_task_batch_size,
    head_mask,
    merge_parts,
    per_task_grads,
    split_parts,
    sum_heads,
    task_map,
)

__all__ = ["GradFn", "fmtl", "fmtl_grad_fn", "mtl_grad_fn", "task_grad_fn"]

PyTree = Any
Aggregator = Callable[..., PyTree]
GradFn = Callable[..., tuple[PyTree, dict[str, Any]]]


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def _call_loss(loss_fn, has_aux, p, batch, args):
    out = loss_fn(p, batch, *args)
    return out if has_aux else (out, None)


def mtl_grad_fn(
    loss_fn: Callable[..., Any],
    aggregator: Aggregator | None = linear,
    *,
    head_rules: ct.Rules = (),
    has_aux: bool = False,
    task_batch_size: int | None = None,
    unroll: bool = False,
) -> GradFn:
    """A gradient function that aggregates the per-task gradients of the shared parameters.

    ``grad_fn(params, batch, *args, key=None, weights=None) -> (grads, info)``: one forward
    and T (vectorised) backward passes (:func:`cljax.mtl.per_task_grads`); the shared
    gradient is ``aggregator(stacked_task_grads, key=key)``; each head gets the gradient
    of its own task. ``aggregator=None`` is equal weighting by one backward pass of the
    mean loss (``weights`` if given: of ``sum_i weights[i] L_i``): the cheap baseline,
    the same gradient as :func:`cljax.mtl.linear` at mean scale.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> losses[T]`` or ``(losses, aux)``.
      aggregator: a :mod:`cljax.mtl` aggregator, called as ``aggregator(task_grads,
        key=key)`` (bind hyperparameters with ``functools.partial``), or ``None``.
      head_rules: ``(regex, bool)`` rules, ``True`` for task-specific (head) leaves.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      task_batch_size: backward passes this many tasks at a time (``lax.map``), or all
        at once (``vmap``) with ``None``.
      unroll: run the ``task_batch_size`` chunks as a Python loop, not ``lax.map``
        (faster for convolutions on XLA:CPU; see :func:`cljax.mtl.per_task_grads`).

    Returns:
      The gradient function; ``info`` holds ``"losses"`` ([T]) and ``"aux"``.

    Raises:
      ValueError: on a bad ``task_batch_size``, or ``unroll`` without one.

    Example::

      >>> grad_fn = mtl_grad_fn(loss_fn, cljax.mtl.mgda, head_rules=[(r"head_", True)])
      >>> grads, info = jax.jit(grad_fn)(params, batch)

    References:
      Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
    """
    check_task_batch_size("mtl_grad_fn", task_batch_size, unroll)

    def grad_fn(params, batch, *args, key=None, weights=None):
        if aggregator is None:

            def total(p):
                losses, aux = _call_loss(loss_fn, has_aux, p, batch, args)
                t = _check_losses(losses)
                w = jnp.full((t,), 1.0 / t, losses.dtype) if weights is None else weights
                return jnp.dot(w, losses), (losses, aux)

            grads, (losses, aux) = jax.grad(total, has_aux=True)(params)
            return grads, {"losses": losses, "aux": aux}
        tg = per_task_grads(
            loss_fn,
            params,
            batch,
            *args,
            head_rules=head_rules,
            has_aux=has_aux,
            weights=weights,
            task_batch_size=task_batch_size,
            unroll=unroll,
        )
        shared = aggregator(tg.shared, key=key)
        return merge_parts(shared, tg.heads), {"losses": tg.losses, "aux": tg.aux}

    return grad_fn


def fmtl(
    loss_fn: Callable[..., Any],
    aggregator: Aggregator = linear,
    *,
    rho: float,
    adaptive: bool = False,
    normalization: Literal["joint", "separate"] = "joint",
    head_rules: ct.Rules = (),
    has_aux: bool = False,
    task_batch_size: int | None = None,
    unroll: bool = False,
    eps: float = 1e-12,
) -> GradFn:
    """F-MTL: aggregate the clean task gradients and their flatness directions separately.

    The returned ``grad_fn(params, batch, *args, key=None, weights=None) -> (grads, info)``
    performs, in T+1 forward and 2T backward passes (vectorised over tasks):

    1. a clean pass: losses ``L_i``, gradients ``grad L_i`` (one forward, T backward);
    2. per task, a perturbation of the shared parameters *and that task's head* from that
       task's gradient alone: ``e_i = rho * a * grad L_i / ||a' * grad L_i||`` (SAM:
       ``a = a' = 1``; ASAM: ``a = w^2``, ``a' = |w|``); other heads are untouched since
       ``L_i`` does not depend on them. ``normalization="joint"`` takes the norm over
       shared and head parts together (multi-mnist reference), ``"separate"`` normalises
       each part to radius ``rho`` (NYUv2 / CelebA / Cityscapes references);
    3. per task, the gradient at its perturbed point: ``g_i^SAM`` on the shared
       parameters, and head i's final gradient;
    4. ``grads_shared = aggregator({g_i}) + aggregator({h_i})`` with the flatness directions
       ``h_i = g_i^SAM - g_i`` (two independent solves).

    BatchNorm: only the clean pass's auxiliary output (e.g. updated ``batch_stats``) is
    returned, so running statistics update on the clean pass only (as the reference,
    github.com/VietHoang1512/FS-MTL, freezes them with momentum 0 on the perturbed passes).

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> losses[T]`` or ``(losses, aux)``.
      aggregator: called as ``aggregator(task_grads, key=key)`` on each of ``{g_i}`` and
        ``{h_i}`` (independent keys); default equal weighting (the mean, so F-EW is the mean
        of the ``g_i^SAM``).
      rho: perturbation radius, ``>= 0`` (the paper's scripts use ASAM with ``rho=2``).
      adaptive: ASAM perturbation.
      normalization: ``"joint"`` or ``"separate"`` (see above).
      head_rules: ``(regex, bool)`` rules, ``True`` for task-specific (head) leaves.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      task_batch_size: tasks per vectorised chunk (``lax.map``), ``None`` for all (vmap).
        Each perturbed pass runs the model at its own task's weights, which ``vmap``
        turns into batched (grouped) convolutions: on XLA:CPU, ``task_batch_size=1,
        unroll=True`` runs convolutional models faster (Multi-MNIST LeNet, T = 8, F-EW
        step: 2.6x).
      unroll: run the chunks as a Python loop, not ``lax.map`` (see
        :func:`cljax.mtl.per_task_grads`).
      eps: added to the perturbation norms.

    Returns:
      The gradient function; ``info`` holds ``"losses"`` (clean, [T]), ``"aux"`` (clean),
      ``"sam_losses"`` ([T], each task at its own perturbed point).

    Raises:
      ValueError: if ``rho < 0``, on an unknown ``normalization``, a bad
        ``task_batch_size`` or ``unroll`` without one.

    Example::

      >>> grad_fn = fmtl(loss_fn, functools.partial(cljax.mtl.cagrad, c=0.4), rho=2.0,
      ...                adaptive=True, head_rules=[(r"head_", True)])
      >>> grads, info = jax.jit(grad_fn)(params, batch, key=key)

    References:
      Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions",
      arXiv 2211.13723 (ICCV 2025: "Beyond Losses Reweighting: Empowering Multi-Task
      Learning via the Generalization Perspective").
    """
    sam_fn = fmtl_grad_fn(
        loss_fn,
        rho=rho,
        adaptive=adaptive,
        normalization=normalization,
        head_rules=head_rules,
        has_aux=has_aux,
        task_batch_size=task_batch_size,
        unroll=unroll,
        eps=eps,
        name="fmtl",
    )

    def grad_fn(params, batch, *args, key=None, weights=None):
        tg, info = sam_fn(params, batch, *args, weights=weights)
        mask = head_mask(params, head_rules)
        g, _ = split_parts(tg.clean, mask)
        g_sam, heads = split_parts(tg.sam, mask)
        h = jax.tree.map(lambda a, b: a - b, g_sam, g)
        k_g, k_h = _keys(key, 2)
        shared = jax.tree.map(lambda a, b: a + b, aggregator(g, key=k_g), aggregator(h, key=k_h))
        return merge_parts(shared, sum_heads(heads)), info

    return grad_fn


def task_grad_fn(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    task_batch_size: int | None = None,
    unroll: bool = False,
) -> GradFn:
    """A gradient function returning the stacked per-task gradients of every parameter.

    ``grad_fn(params, batch, *args, weights=None) -> (stacked, info)``: one forward and T
    (vectorised) backward passes; ``stacked`` has the parameters' structure with a leading
    task axis T on every leaf (row i is ``grad L_i``, ``grad (weights[i] L_i)`` with
    ``weights``), the input of :func:`cljax.mtl.aggregate`. Heads are not split off here:
    the aggregate transform's ``head_rules`` do that.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> losses[T]`` or ``(losses, aux)``.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      task_batch_size: tasks per vectorised chunk (``lax.map``), ``None`` for all (vmap).
      unroll: run the chunks as a Python loop (see :func:`cljax.mtl.per_task_grads`).

    Returns:
      The gradient function; ``info`` holds ``"losses"`` ([T]) and ``"aux"``.

    Raises:
      ValueError: on a bad ``task_batch_size``, or ``unroll`` without one.

    Example::

      >>> tx = optax.chain(cljax.mtl.aggregate(cljax.mtl.mgda), optax.adam(1e-3))
      >>> stacked, info = task_grad_fn(losses_fn)(params, batch)
    """
    check_task_batch_size("task_grad_fn", task_batch_size, unroll)

    def grad_fn(params, batch, *args, weights=None):
        f = lambda p: _call_loss(loss_fn, has_aux, p, batch, args)
        losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
        t = _check_losses(losses)
        cot = jnp.eye(t, dtype=losses.dtype)
        if weights is not None:
            cot = cot * jnp.asarray(weights, losses.dtype)[:, None]
        (jac,) = task_map(vjp_fn, cot, task_batch_size, unroll)
        return jac, {"losses": losses, "aux": aux}

    return grad_fn


def fmtl_grad_fn(
    loss_fn: Callable[..., Any],
    *,
    rho: float,
    adaptive: bool = False,
    normalization: Literal["joint", "separate"] = "joint",
    head_rules: ct.Rules = (),
    has_aux: bool = False,
    task_batch_size: int | None = None,
    unroll: bool = False,
    eps: float = 1e-12,
    name: str = "fmtl_grad_fn",
) -> GradFn:
    """F-MTL's per-task gradients, clean and sharpness-aware, for :func:`cljax.mtl.aggregate`.

    ``grad_fn(params, batch, *args, weights=None) -> (FMTLGrads(clean, sam), info)``:
    steps 1-3 of :func:`cljax.mtl.fmtl` (T+1 forward, 2T backward passes), leaving step 4
    (the two aggregator solves) to the aggregate transform, which holds the key. Both
    trees are stacked (leading axis T on every leaf); ``head_rules`` here only serve
    ``normalization="separate"`` (a perturbation touches the shared leaves and its own
    task's head either way, since ``L_i`` does not depend on the other heads).

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> losses[T]`` or ``(losses, aux)``.
      rho: perturbation radius, ``>= 0``.
      adaptive: ASAM perturbation.
      normalization: ``"joint"`` or ``"separate"`` (see :func:`cljax.mtl.fmtl`).
      head_rules: ``(regex, bool)`` rules, ``True`` for task-specific (head) leaves.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      task_batch_size: tasks per vectorised chunk (``lax.map``), ``None`` for all (vmap).
      unroll: run the chunks as a Python loop, not ``lax.map``.
      eps: added to the perturbation norms.
      name: used in error messages.

    Returns:
      The gradient function; ``info`` holds ``"losses"`` (clean, [T]), ``"aux"`` (clean),
      ``"sam_losses"`` ([T]).

    Raises:
      ValueError: if ``rho < 0``, on an unknown ``normalization``, a bad
        ``task_batch_size`` or ``unroll`` without one.

    Example::

      >>> heads = [(r"^head_", True)]
      >>> tx = optax.chain(cljax.mtl.aggregate(cljax.mtl.pcgrad, head_rules=heads),
      ...                  optax.adam(1e-3))
      >>> grads, info = fmtl_grad_fn(losses_fn, rho=0.05, head_rules=heads)(params, batch)

    References:
      Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions",
      arXiv 2211.13723.
    """
    check_scalar(rho, name="rho", where=name, low=0.0)
    if normalization not in ("joint", "separate"):
        raise ValueError(f"{name}: {normalization=} must be 'joint' or 'separate'")
    check_task_batch_size(name, task_batch_size, unroll)

    def grad_fn(params, batch, *args, weights=None):
        f = lambda p: _call_loss(loss_fn, has_aux, p, batch, args)
        losses, vjp_fn, aux = jax.vjp(f, params, has_aux=True)
        t = _check_losses(losses)
        eye = jnp.eye(t, dtype=losses.dtype)
        (jac,) = task_map(vjp_fn, eye, task_batch_size, unroll)
        mask = head_mask(params, head_rules)
        flat_mask = jax.tree.leaves(mask)

        # Per-task squared norms of a' * grad L_i, by part (shared / head).
        def sq(x, w, is_head):
            xf = x.astype(jnp.float32) if x.dtype != jnp.float64 else x
            a = jnp.abs(w).astype(xf.dtype) * xf if adaptive else xf
            return jnp.sum((a * a).reshape(t, -1), axis=1), is_head

        parts = [
            sq(x, w, m)
            for x, w, m in zip(
                jax.tree.leaves(jac), jax.tree.leaves(params), flat_mask, strict=True
            )
        ]
        zero = jnp.zeros((t,), jnp.float32)
        sq_shared = sum((s for s, m in parts if not m), zero)
        sq_head = sum((s for s, m in parts if m), zero)
        if normalization == "joint":
            n_all = jnp.sqrt(sq_shared + sq_head) + eps
            n_shared, n_head = n_all, n_all
        else:
            n_shared, n_head = jnp.sqrt(sq_shared) + eps, jnp.sqrt(sq_head) + eps
        scale_shared, scale_head = rho / n_shared, rho / n_head

        def perturbed_grad(task):
            i, e_i = task

            def leaf(w, g, m):
                s = jnp.where(m, scale_head[i], scale_shared[i]).astype(g.dtype)
                d = (w * w).astype(g.dtype) * g if adaptive else g
                return w + (d * s).astype(w.dtype)

            p_i = jax.tree.map(leaf, params, jax.tree.map(lambda x: x[i], jac), mask)
            loss_i = lambda p: jnp.dot(e_i, f(p)[0])
            return jax.value_and_grad(loss_i)(p_i)

        # Indexing jac inside the mapped function keeps one perturbed copy per chunk.
        sam_losses, jac_sam = task_map(
            perturbed_grad, (jnp.arange(t), eye), task_batch_size, unroll
        )

        if weights is not None:
            w = jnp.asarray(weights)
            scale_rows = lambda tree: jax.tree.map(
                lambda x: x * w.astype(x.dtype).reshape((t,) + (1,) * (x.ndim - 1)), tree
            )
            jac, jac_sam = scale_rows(jac), scale_rows(jac_sam)
        info = {"losses": losses, "aux": aux, "sam_losses": sam_losses}
        return FMTLGrads(clean=jac, sam=jac_sam), info

    return grad_fn
