"""Exponential moving average of the weights, with optional bias correction."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cljax._checks import check_scalar
from cljax.averaging._base import Averager, _copy_accum, _move_toward
from cljax.tree import Params

__all__ = ["EmaState", "ema"]


class EmaState(NamedTuple):
    """State of :func:`ema`.

    Attributes:
      mean: the average (bias-corrected when ``debias=True``), float32 leaves.
      count: int32, the number of updates folded in.
    """

    mean: Params
    count: jax.Array


def ema(*, decay: float, debias: bool = False) -> Averager:
    """An exponential moving average of the parameters, updated after every step.

    Without bias correction the average starts at the initial parameters and moves
    ``mean <- decay * mean + (1 - decay) * params`` (ZSCL's ``moving_avg``). With
    ``debias=True`` it is the bias-corrected average of the snapshots alone,
    ``sum_i decay^(t-i) params_i / sum_i decay^(t-i)`` (Adam's correction of a zero-started
    average, ``ema_t / (1 - decay^t)``), kept directly as
    ``mean <- mean + (1 - decay) / (1 - decay^t) * (params - mean)``: the first update
    copies the parameters, and the initial weights carry no weight at all.

    Args:
      decay: in [0, 1); 0 keeps the latest parameters.
      debias: apply the bias correction.

    Returns:
      An :class:`Averager` whose state is :class:`EmaState`.

    Raises:
      ValueError: if ``decay`` is not a real number in [0, 1) (a bool, NaN or an array
        included).

    Example:
      >>> avg = ema(decay=0.999, debias=True)
      >>> s = avg.init({"w": jnp.zeros(3)})
      >>> mean, s = avg.update({"w": jnp.ones(3)}, s)
      >>> mean["w"]
      Array([1., 1., 1.], dtype=float32)

    References:
      Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", 1992;
      Kingma and Ba, "Adam", ICLR 2015 (bias correction).
    """
    check_scalar(decay, name="decay", where="ema", low=0.0, high=1.0, high_open=True)
    decay = float(decay)
    one_minus = 1.0 - decay
    log_decay = math.log(decay) if decay > 0 else -math.inf

    def init(params: Params) -> EmaState:
        return EmaState(mean=_copy_accum(params), count=jnp.zeros((), jnp.int32))

    def update(
        params: Params, state: EmaState, *, step: jax.Array | int | None = None
    ) -> tuple[Params, EmaState]:
        del step  # the average counts its own updates
        count = state.count + 1
        if debias and decay > 0:
            # (1 - d) / (1 - d^t) as expm1(log d) / expm1(t log d): no cancellation near
            # d = 1, and exactly 1 at t = 1.
            log_d = jnp.float32(log_decay)
            weight = jnp.expm1(log_d) / jnp.expm1(count.astype(jnp.float32) * log_d)
        elif debias:
            weight = jnp.float32(1.0)
        else:
            weight = jnp.float32(one_minus)
        mean = _move_toward(state.mean, params, weight)
        return mean, EmaState(mean=mean, count=count)

    return Averager(init, update)
