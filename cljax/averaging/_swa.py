"""Stochastic weight averaging: a uniform running mean of snapshots taken every k steps."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cljax._checks import check_int
from cljax.averaging._base import Averager, _copy_accum, _move_toward
from cljax.tree import Params

__all__ = ["SwaState", "swa"]


class SwaState(NamedTuple):
    """State of :func:`swa`.

    Attributes:
      mean: the uniform mean of the snapshots (the initial parameters until the first).
      count: int32, the number of snapshots in the mean.
    """

    mean: Params
    count: jax.Array


def swa(*, start: int = 0, every: int = 1) -> Averager:
    """Stochastic weight averaging: the uniform mean of the parameters after update ``s``
    for every ``s >= start`` with ``(s - start) % every == 0``.

    ``s`` is ``TrainState.step`` after the update (1 after the first update). The initial
    parameters are not part of the mean: the first snapshot replaces them.

    Args:
      start: first update count eligible for a snapshot (``>= 0``).
      every: snapshot period in updates (``>= 1``).

    Returns:
      An :class:`Averager` whose state is :class:`SwaState`.

    Raises:
      ValueError: if ``start`` is not an integer >= 0 or ``every`` not an integer >= 1
        (``every=2.5`` included); ``update`` raises without ``step``.

    Example:
      >>> avg = swa(start=100, every=10)
      >>> s = avg.init({"w": jnp.zeros(2)})
      >>> _, s = avg.update({"w": jnp.ones(2)}, s, step=100)
      >>> int(s.count)
      1

    References:
      Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
      Generalization", UAI 2018.
    """
    start = check_int(start, name="start", where="swa", low=0)
    every = check_int(every, name="every", where="swa", low=1)

    def init(params: Params) -> SwaState:
        return SwaState(mean=_copy_accum(params), count=jnp.zeros((), jnp.int32))

    def update(
        params: Params, state: SwaState, *, step: jax.Array | int | None = None
    ) -> tuple[Params, SwaState]:
        if step is None:
            raise ValueError("swa: update needs step= (TrainState.step after the optimizer update)")
        step = jnp.asarray(step, jnp.int32)
        take = (step >= start) & ((step - start) % every == 0)

        def snapshot(s: SwaState) -> SwaState:
            count = s.count + 1
            weight = 1.0 / count.astype(jnp.float32)
            return SwaState(mean=_move_toward(s.mean, params, weight), count=count)

        new = jax.lax.cond(take, snapshot, lambda s: s, state)
        return new.mean, new

    return Averager(init, update)
