"""Stateful loss weightings: uncertainty weighting (UW), DWA and random loss weighting (RLW).

A :class:`LossWeighting` follows the protocol of every stateful method
(:mod:`cljax.stateful`): ``init() -> state`` and, in optax's order,
``update(losses, state, *, key=None) -> (weighted_losses, new_state)``, which records the
step's task losses. A third pure function, ``weights(state, key=None) -> [T]``, gives this
step's loss weights. The weights multiply the task losses (so the per-task gradients) before
any aggregator, ``grad_fn(params, batch, weights=weighting.weights(state, key))``, and the
losses exist only after that forward pass: so reading the weights and recording the losses
are two functions, where a single ``update`` would apply the weights a step late or run the
forward pass twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from cljax._checks import check_int, check_scalar
from cljax.stateful import EmptyState

__all__ = [
    "DWAState",
    "LossWeighting",
    "UWState",
    "dwa",
    "random_loss_weighting",
    "uncertainty_weighting",
]


class LossWeighting(NamedTuple):
    """A loss weighting as pure functions around an explicit state (:mod:`cljax.stateful`).

    Attributes:
      init: ``init() -> state``, a NamedTuple.
      update: ``update(losses, state, *, key=None) -> (weighted_losses, new_state)``:
        records the step's ``[T]`` task losses (after the forward pass; no gradient flows
        into the state) and returns them multiplied by the weights of ``state``, the
        weights this step's gradient used when ``key`` is the key given to ``weights``.
        Jit-able.
      weights: ``weights(state, key=None) -> [T]``: this step's loss weights, read
        before the gradient. A random weighting needs ``key``.
    """

    init: Callable[[], Any]
    update: Callable[..., tuple[jax.Array, Any]]
    weights: Callable[..., jax.Array]


def _weighted(losses: jax.Array, w: jax.Array) -> jax.Array:
    return w * jax.lax.stop_gradient(losses).astype(jnp.float32)


def _check_tasks(num_tasks: int, where: str) -> None:
    check_int(num_tasks, name="num_tasks", where=where, low=1)


class UWState(NamedTuple):
    """Log-variances ``s`` (one per task) and the state of their optimiser."""

    log_vars: jax.Array
    opt_state: Any


def uncertainty_weighting(num_tasks: int, *, learning_rate: float = 1e-3) -> LossWeighting:
    """Homoscedastic uncertainty weighting: ``sum_i L_i / (2 e^{s_i}) + s_i / 2``.

    The weights are ``1 / (2 e^{s_i})`` (LibMTL's ``UW``; 0.5 at the start). ``update``
    takes one Adam step on ``s`` with the closed-form gradient ``(1 - L_i e^{-s_i}) / 2``
    of the objective above (the reference trains ``s`` with the model's optimiser).

    Scale convention: *sum* scale, weights near 1/2 each at the start.

    Args:
      num_tasks: T.
      learning_rate: Adam learning rate of the log-variances.

    Returns:
      A :class:`LossWeighting`.

    Raises:
      ValueError: if ``num_tasks < 1`` or ``learning_rate <= 0``.

    Example::

      >>> uw = uncertainty_weighting(2); s = uw.init()
      >>> w = uw.weights(s); _, s = uw.update(losses, s)

    References:
      Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
      Geometry and Semantics", CVPR 2018.
    """
    _check_tasks(num_tasks, "uncertainty_weighting")
    check_scalar(
        learning_rate, name="learning_rate", where="uncertainty_weighting", low=0.0, low_open=True
    )
    tx = optax.adam(learning_rate)

    def init():
        s = jnp.zeros((num_tasks,), jnp.float32)
        return UWState(s, tx.init(s))

    def weights(state, key=None):
        del key
        return 0.5 * jnp.exp(-state.log_vars)

    def update(losses, state, *, key=None):
        g = 0.5 * (
            1.0 - jax.lax.stop_gradient(losses).astype(jnp.float32) * jnp.exp(-state.log_vars)
        )
        upd, opt_state = tx.update(g, state.opt_state, state.log_vars)
        # apply_updates is typed on trees; on an array it returns an array
        new = UWState(cast(jax.Array, optax.apply_updates(state.log_vars, upd)), opt_state)
        return _weighted(losses, weights(state, key)), new

    return LossWeighting(init, update, weights)


class DWAState(NamedTuple):
    """Step count, running sum of this epoch's losses, and the last two epochs' means."""

    step: jax.Array
    running: jax.Array
    last: jax.Array
    before_last: jax.Array


def dwa(num_tasks: int, *, steps_per_epoch: int, temperature: float = 2.0) -> LossWeighting:
    """Dynamic weight averaging: ``w_i = T softmax(r / temperature)_i``, ``r_i = L_i(e-1) / L_i(e-2)``.

    ``L_i(e)`` is the mean training loss of task i over epoch e; the weights are 1 during
    the first two epochs, as the reference (MTAN).

    Scale convention: *sum* scale (weights sum to T).

    Args:
      num_tasks: T.
      steps_per_epoch: steps that make an epoch (``update`` calls).
      temperature: softmax temperature (the reference's 2).

    Returns:
      A :class:`LossWeighting`.

    Raises:
      ValueError: on ``num_tasks < 1``, ``steps_per_epoch < 1`` or ``temperature <= 0``.

    Example::

      >>> w8 = dwa(2, steps_per_epoch=100); s = w8.init()

    References:
      Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019.
    """
    _check_tasks(num_tasks, "dwa")
    check_int(steps_per_epoch, name="steps_per_epoch", where="dwa", low=1)
    check_scalar(temperature, name="temperature", where="dwa", low=0.0, low_open=True)
    t = num_tasks

    def init():
        z = jnp.zeros((t,), jnp.float32)
        return DWAState(jnp.zeros((), jnp.int32), z, z, z)

    def weights(state, key=None):
        del key
        epoch = state.step // steps_per_epoch
        r = state.last / jnp.maximum(state.before_last, 1e-12)
        w = t * jax.nn.softmax(r / temperature)
        return jnp.where(epoch >= 2, w, jnp.ones((t,), jnp.float32))

    def update(losses, state, *, key=None):
        running = state.running + jax.lax.stop_gradient(losses).astype(jnp.float32)
        step = state.step + 1
        done = step % steps_per_epoch == 0
        mean = running / steps_per_epoch
        new = DWAState(
            step=step,
            running=jnp.where(done, 0.0, running),
            last=jnp.where(done, mean, state.last),
            before_last=jnp.where(done, state.last, state.before_last),
        )
        return _weighted(losses, weights(state, key)), new

    return LossWeighting(init, update, weights)


def random_loss_weighting(num_tasks: int) -> LossWeighting:
    """Random loss weighting: ``w = softmax(z)``, ``z ~ N(0, I)`` drawn afresh each step.

    Stateless (its state is ``EmptyState()``) apart from the key passed to ``weights`` and
    ``update`` (required by both).

    Scale convention: *mean* scale (weights sum to 1), as LibMTL's ``RLW``.

    Args:
      num_tasks: T.

    Returns:
      A :class:`LossWeighting`.

    Raises:
      ValueError: if ``num_tasks < 1``; ``weights`` and ``update`` raise without a key.

    Example::

      >>> rlw = random_loss_weighting(2); w = rlw.weights(rlw.init(), key)

    References:
      Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for
      Multi-Task Learning", TMLR 2022.
    """
    _check_tasks(num_tasks, "random_loss_weighting")

    def init():
        return EmptyState()

    def weights(state, key=None):
        del state
        if key is None:
            raise ValueError("random_loss_weighting: weights() needs a PRNG key")
        return jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32))

    def update(losses, state, *, key=None):
        if key is None:
            raise ValueError(
                "random_loss_weighting: update() needs key= (the key given to weights())"
            )
        return _weighted(losses, weights(state, key)), state

    return LossWeighting(init, update, weights)
