"""Aggregators inside optax: a transformation from stacked per-task gradients to one update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax import tree as ct
from cljax.mtl._per_task import head_mask, merge_parts, split_parts

__all__ = ["AggregateState", "FMTLGrads", "aggregate"]

PyTree = Any


class AggregateState(NamedTuple):
    """State of :func:`aggregate`.

    Attributes:
      key: the PRNG key of the next step; each update splits it and passes one half to
        the aggregator.
      inner: the aggregator's own state (``optax.EmptyState()`` for a plain function).
    """

    key: jax.Array
    inner: Any


class FMTLGrads(NamedTuple):
    """Per-task gradients of F-MTL, input of :func:`aggregate`.

    Both trees have the structure of the parameters with a leading task axis T on every
    leaf (row i is task i's gradient). :func:`aggregate` combines the shared leaves as
    ``aggregator({clean_i}) + aggregator({sam_i - clean_i})`` (two independent solves,
    independent keys) and gives each head the sum over tasks of ``sam``, its own task's
    gradient at that task's perturbed point.

    Attributes:
      clean: the gradients ``grad L_i`` at the parameters.
      sam: the gradients ``grad L_i`` at task i's perturbed parameters.
    """

    clean: PyTree
    sam: PyTree


def _check_stacked(stacked: PyTree, params: PyTree | None, name: str) -> int:
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError(f"{name}: the per-task gradients have no leaves")
    t = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
    if params is not None and t is not None:
        try:
            ct.check_same_structure(params, stacked, names=("params", "updates"), b_leading=(t,))
        except ValueError as e:
            raise ValueError(
                f"{name}: the updates must be per-task gradients stacked on a leading task "
                f"axis T (here T={t} from the first leaf): {e}"
            ) from None
    try:
        return ct.num_stacked(stacked)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _sum_tasks(x: jax.Array) -> jax.Array:
    return ct.sum_slices(list(x), ct.accum_dtype(x.dtype)).astype(x.dtype)


def aggregate(
    aggregator: Callable[..., PyTree] | optax.GradientTransformationExtraArgs,
    *,
    key: jax.Array | int = 0,
    head_rules: ct.Rules = (),
) -> optax.GradientTransformationExtraArgs:
    """A gradient aggregator as the first transformation of an ``optax.chain``.

    The update takes a *stacked* tree of per-task gradients (each leaf of the parameters'
    shape with a leading task axis T), e.g. from
    :func:`cljax.mtl.task_grad_fn`, and returns one update of the parameters' structure,
    without the T axis: shared leaves (those no ``head_rules`` rule marks ``True``) get
    ``aggregator(stacked_shared, key=k)``; head leaves get the sum over tasks (only the
    owner task's row is non-zero). An :class:`FMTLGrads` input (from
    :func:`cljax.mtl.fmtl_grad_fn`) gets F-MTL's two solves instead (see there).

    The PRNG key lives in the state: each update splits it, so PCGrad's orders and
    GradDrop's draws change every step without the caller threading keys.

    ``optax.chain`` calls every transformation's ``init`` with the parameters and feeds
    each ``update`` the previous one's output, so a transformation may change the tree's
    structure: this one must come *first* in the chain, and the transformations after it
    (Adam, clipping, a projection) see, and were initialised for, the plain parameter
    tree. ``TrainState.apply_gradients`` takes the stacked tree as its ``grads``.

    Args:
      aggregator: a :mod:`cljax.mtl` aggregator (``aggregator(stacked, key=k) -> tree``;
        bind hyperparameters with ``functools.partial``), or a stateful one: an optax
        transformation whose ``update(stacked_shared, state, params, key=k)`` returns the
        combined tree; its state is ``AggregateState.inner`` (with :class:`FMTLGrads`
        its update runs twice a step, on the clean then on the flatness directions).
      key: the initial PRNG key, or an integer seed.
      head_rules: ``(regex, bool)`` path rules, ``True`` for task-specific (head) leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AggregateState`.
      Unknown extra args are ignored, so the chain may carry them for later transforms.

    Raises:
      TypeError: if ``aggregator`` is not callable.
      ValueError: at update time, if a leaf is not the parameter's shape with a leading T
        axis (naming the first such path), on T disagreeing between leaves, or if
        ``head_rules`` leave no shared leaf.

    Example::

      >>> tx = optax.chain(cljax.mtl.aggregate(cljax.mtl.pcgrad, key=0,
      ...                                      head_rules=[(r"^head_", True)]),
      ...                  optax.adam(1e-3))
      >>> state = TrainState.create(params, tx)
      >>> stacked, info = cljax.mtl.task_grad_fn(losses_fn)(state.params, batch)
      >>> state = state.apply_gradients(stacked)

    References:
      Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020 (PCGrad).
      Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions",
      arXiv 2211.13723 (F-MTL).
    """
    stateful = isinstance(aggregator, optax.GradientTransformation)
    if not stateful and not callable(aggregator):
        raise TypeError(f"aggregate: {aggregator=} is neither callable nor an optax transform")
    ct.rule_values({}, head_rules)  # validates the rules' form now

    def init_fn(params):
        k = jax.random.key(key) if isinstance(key, int) else key
        inner = aggregator.init(params) if stateful else optax.EmptyState()
        return AggregateState(key=k, inner=inner)

    def call(stacked, inner, params, k):
        if stateful:
            return aggregator.update(stacked, inner, params, key=k)
        return aggregator(stacked, key=k), inner

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        fm = isinstance(updates, FMTLGrads)
        parts = (updates.clean, updates.sam) if fm else (updates,)
        names = ("aggregate: updates.clean", "aggregate: updates.sam") if fm else ("aggregate",)
        ts = {_check_stacked(p, params, n) for p, n in zip(parts, names, strict=True)}
        if len(ts) > 1:
            raise ValueError(f"aggregate: clean and sam gradients have T={sorted(ts)}")
        mask = head_mask(parts[0], head_rules)
        if all(jax.tree.leaves(mask)):
            raise ValueError(f"aggregate: {head_rules=} mark every leaf as a head")
        new_key, sub = jax.random.split(state.key)
        inner = state.inner
        if fm:
            g, _ = split_parts(updates.clean, mask)
            g_sam, heads = split_parts(updates.sam, mask)  # heads: their own SAM gradient
            h = jax.tree.map(lambda a, b: a - b, g_sam, g)
            k_g, k_h = jax.random.split(sub)
            a_g, inner = call(g, inner, params, k_g)
            a_h, inner = call(h, inner, params, k_h)
            shared = jax.tree.map(lambda a, b: a + b, a_g, a_h)
        else:
            g, heads = split_parts(updates, mask)
            shared, inner = call(g, inner, params, sub)
        out = merge_parts(shared, jax.tree.map(_sum_tasks, heads))
        return out, AggregateState(key=new_key, inner=inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
