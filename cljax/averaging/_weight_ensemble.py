"""ZSCL's weight ensemble: a running mean of snapshots taken every k iterations of a task."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cljax._checks import check_int
from cljax.averaging._base import Averager, _copy_accum, _move_toward
from cljax.tree import Params

__all__ = ["WeightEnsembleState", "weight_ensemble"]


class WeightEnsembleState(NamedTuple):
    """State of :func:`weight_ensemble`.

    Attributes:
      mean: the uniform mean of the start-of-task weights and the snapshots so far.
      count: int32, the number of trees in the mean (1 right after ``init``: the
        start-of-task weights).
      iteration: int32, the updates seen since ``init`` (the iteration of the task).
    """

    mean: Params
    count: jax.Array
    iteration: jax.Array


def weight_ensemble(*, every: int = 100) -> Averager:
    """ZSCL's weight ensemble (WE), faithful to the reference's bookkeeping.

    ``init(params)`` takes the start-of-task weights as the first member of the mean.
    After the optimizer update of task iteration ``i`` (0-based, counted by the state),
    if ``i % every == 0`` the new parameters join the mean:
    ``n <- n + 1; mean <- (n * mean + params) / (n + 1)`` with ``n`` the snapshots taken so
    far. Iteration 0 is included, so after ``1000 + 1`` iterations with ``every=100`` the
    mean is the uniform average of ``{theta_start, theta_0, theta_100, ..., theta_1000}``
    (12 trees). The averaged model is what the next task starts from: use
    :func:`~cljax.averaging.averaging_next_task` between tasks.

    The iteration is counted by the state, not read from ``TrainState.step``, so the
    schedule restarts with every task whatever the global step; the ``step`` keyword of
    ``update`` is ignored.

    Args:
      every: snapshot period in iterations (``>= 1``; the reference's ``avg_freq``); 100
        in ZSCL's MTIL scripts, 10 in its class-incremental configs.

    Returns:
      An :class:`Averager` whose state is :class:`WeightEnsembleState`.

    Raises:
      ValueError: if ``every < 1``.

    Example:
      >>> we = weight_ensemble(every=2)
      >>> s = we.init({"w": jnp.zeros(())})            # theta_start = 0
      >>> for i, w in enumerate([3.0, 5.0, 6.0]):      # iterations 0, 1, 2
      ...     _, s = we.update({"w": jnp.asarray(w)}, s)
      >>> float(s.mean["w"])  # mean of {0, 3, 6}: iterations 0 and 2 were taken
      3.0

    References:
      Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
      Vision-Language Models", ICCV 2023 (``merge_we`` in ``mtil/src/models/helpers.py``).
    """
    every = check_int(every, name="every", where="weight_ensemble", low=1)

    def init(params: Params) -> WeightEnsembleState:
        return WeightEnsembleState(
            mean=_copy_accum(params),
            count=jnp.ones((), jnp.int32),
            iteration=jnp.zeros((), jnp.int32),
        )

    def update(
        params: Params, state: WeightEnsembleState, *, step: jax.Array | int | None = None
    ) -> tuple[Params, WeightEnsembleState]:
        del step  # the task iteration is counted by the state

        def snapshot(s: WeightEnsembleState) -> WeightEnsembleState:
            count = s.count + 1
            weight = 1.0 / count.astype(jnp.float32)
            return s._replace(mean=_move_toward(s.mean, params, weight), count=count)

        new = jax.lax.cond(state.iteration % every == 0, snapshot, lambda s: s, state)
        new = new._replace(iteration=state.iteration + 1)
        return new.mean, new

    return Averager(init, update)
