"""Online EWC: a diagonal-Fisher quadratic penalty around the previous tasks' weights."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax._checks import check_scalar

__all__ = ["EWCState", "diagonal_fisher", "ewc_penalty", "ewc_next_task"]


class EWCState(NamedTuple):
    """Anchor weights and the accumulated diagonal Fisher information (float32)."""

    anchor: ct.Params
    fisher: ct.Params


@functools.lru_cache(maxsize=32)
def _squared_grads(nll_fn):
    """Jitted sum over a chunk of squared per-example gradients (cached per ``nll_fn``)."""
    return jax.jit(
        lambda p, ex: jax.tree.map(
            lambda g: jnp.sum(g.astype(jnp.float32) ** 2, 0),
            jax.vmap(jax.grad(nll_fn), in_axes=(None, 0))(p, ex),
        )
    )


def diagonal_fisher(
    nll_fn: Callable[[ct.Params, Any], jax.Array],
    params: ct.Params,
    examples: Any,
    *,
    chunk_size: int | None = None,
) -> ct.Params:
    """Diagonal Fisher ``F = mean_n (d nll(theta, x_n) / d theta)^2`` from per-example gradients.

    With ``nll_fn`` the negative log-likelihood of the observed label this is the
    *empirical* Fisher; sample the label from the model's predictive distribution inside
    ``nll_fn`` for the true Fisher. Per-example gradients are vectorised with ``vmap``,
    ``chunk_size`` examples at a time.

    Args:
      nll_fn: ``nll_fn(params, example) -> scalar`` for ONE example (a pytree without
        batch axis, e.g. ``{"x": [784], "y": []}``).
      params: parameters at which the Fisher is taken.
      examples: pytree whose leaves have a leading example axis N.
      chunk_size: examples per vectorised chunk (all at once if None).

    Returns:
      A float32 tree like ``params``.

    Raises:
      ValueError: on an empty example set or a non-positive chunk size.

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
    """
    n = int(jax.tree.leaves(examples)[0].shape[0]) if jax.tree.leaves(examples) else 0
    if n == 0:
        raise ValueError("diagonal_fisher: got no examples")
    chunk = n if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"diagonal_fisher: {chunk_size=} must be >= 1")
    sq = _squared_grads(nll_fn)
    total = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
    for s in range(0, n, chunk):
        part = sq(params, jax.tree.map(lambda x, s=s: x[s : s + chunk], examples))
        total = jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda f: f / n, total)


def ewc_next_task(
    state: EWCState | None, params: ct.Params, fisher: ct.Params, *, gamma: float = 1.0
) -> EWCState:
    """Between-task hook of online EWC: ``F <- gamma F + F_new``, anchor ``<- params``.

    Args:
      state: the previous :class:`EWCState` or None after the first task.
      params: the weights at the end of the task (the new anchor).
      fisher: the task's diagonal Fisher (:func:`diagonal_fisher`).
      gamma: decay of the old Fisher in [0, 1] (1 sums the per-task Fishers).

    Returns:
      The new :class:`EWCState`.

    Raises:
      ValueError: on gamma outside [0, 1] or mismatched trees.

    References:
      Schwarz et al., "Progress & Compress: A scalable framework for continual learning",
      ICML 2018 (online EWC).
    """
    check_scalar(gamma, name="gamma", where="ewc_next_task", low=0.0, high=1.0)
    ct.check_same_structure(params, fisher, names=("params", "fisher"))
    fisher = jax.tree.map(lambda f: jnp.asarray(f, jnp.float32), fisher)
    if state is not None:
        fisher = jax.tree.map(lambda old, new: gamma * old + new, state.fisher, fisher)
    anchor = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    return EWCState(anchor=anchor, fisher=fisher)


def ewc_penalty(params: ct.Params, state: EWCState, *, weight: float = 1.0) -> jax.Array:
    """``weight / 2 * sum_k F_k (theta_k - theta*_k)^2``.

    Args:
      params: current parameters.
      state: anchor and Fisher (:func:`ewc_next_task`).
      weight: the penalty's coefficient lambda, >= 0.

    Returns:
      A float32 scalar; no gradient flows into the state.

    Raises:
      ValueError: on a negative weight.

    Example::

      loss = ce + ewc_penalty(params, ewc_state, weight=100.0)

    References:
      Kirkpatrick et al., PNAS 2017; Schwarz et al., ICML 2018.
    """
    check_scalar(weight, name="weight", where="ewc_penalty", low=0.0)
    terms = jax.tree.map(
        lambda p, a, f: jnp.sum(
            jax.lax.stop_gradient(f) * (p.astype(jnp.float32) - jax.lax.stop_gradient(a)) ** 2
        ),
        params,
        state.anchor,
        state.fisher,
    )
    return 0.5 * weight * sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))
