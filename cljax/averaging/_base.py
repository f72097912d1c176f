"""What every weight average shares: the ``Averager`` pair, the step hook, the hand-over."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax.train import TrainState
from cljax.train._state import commit_arrays
from cljax.tree import Params

__all__ = [
    "AverageState",
    "Averager",
    "average_params",
    "averaging_hook",
    "init_averages",
    "averaging_next_task",
]


class AverageState(Protocol):
    """Any averager state: it carries the running average as ``mean``."""

    mean: Params


class Averager(NamedTuple):
    """A weight average as an optax-style pair of pure functions (:mod:`cljax.stateful`).

    Attributes:
      init: ``init(params) -> state``; the state's ``mean`` starts as a float32 copy of
        ``params`` (accumulation dtype: float64 stays float64).
      update: ``update(params, state, *, step=None) -> (mean, new_state)``, in optax's
        order: the parameters after the optimizer update, the state, and ``step``, the
        ``TrainState.step`` after that update (the number of updates applied so far;
        :func:`~cljax.averaging.swa` needs it, the others count their own updates).
        ``mean`` is ``new_state.mean``, in the accumulation dtype
        (:func:`average_params` casts it to the parameters' dtypes). Jit-able.
    """

    init: Callable[[Params], Any]
    update: Callable[..., tuple[Params, Any]]


def _copy_accum(params: Params) -> Params:
    """A float32 (or float64) copy of every float leaf, and a copy of the others.

    A real copy, never an alias: the average lives beside ``params`` in a donated
    ``TrainState``, and XLA refuses to donate one buffer twice.
    """
    ct.check_leaves(params, name="params")

    def copy(x):
        x = jnp.asarray(x)
        dtype = ct.accum_dtype(x.dtype) if ct.is_float(x) else x.dtype
        return jnp.array(x, dtype=dtype, copy=True)

    return jax.tree.map(copy, params)


def _move_toward(mean: Params, params: Params, weight: jax.Array) -> Params:
    """``(1 - weight) * mean + weight * params`` on float leaves, in the mean's dtype.

    This form is exact at both ends (``weight`` 0 keeps ``mean``, 1 copies ``params``).
    Non-float leaves take ``params``.
    """
    ct.check_same_structure(mean, params, names=("average", "params"))

    def leaf(m, p):
        if not ct.is_float(m):
            return jnp.asarray(p).astype(m.dtype)
        w = jnp.asarray(weight, m.dtype)
        return (1 - w) * m + w * jnp.asarray(p).astype(m.dtype)

    return jax.tree.map(leaf, mean, params)


def average_params(avg_state: AverageState, like: Params) -> Params:
    """The average of an averager state, cast to the dtypes of ``like`` (the live params).

    Args:
      avg_state: a state of :func:`~cljax.averaging.ema`, :func:`~cljax.averaging.swa` or
        :func:`~cljax.averaging.weight_ensemble`.
      like: a tree with the structure and storage dtypes of the parameters.

    Returns:
      The averaged parameters, same structure and dtypes as ``like``.

    Raises:
      ValueError: if the structures differ (naming the first differing path).

    Example:
      >>> ema_params = average_params(state.methods["ema"], state.params)  # doctest: +SKIP
    """
    ct.check_same_structure(like, avg_state.mean, names=("params", "average"))
    return ct.cast_like(avg_state.mean, like)


def init_averages(averagers: Mapping[str, Averager], params: Params) -> dict[str, Any]:
    """``{name: averager.init(params)}``, to pass as ``TrainState.create(..., methods=...)``.

    Example:
      >>> avgs = {"ema": ema(decay=0.99), "we": weight_ensemble(every=100)}  # doctest: +SKIP
      >>> state = TrainState.create(params, tx, methods=init_averages(avgs, params))  # doctest: +SKIP
    """
    return {name: av.init(params) for name, av in averagers.items()}


def averaging_hook(
    averagers: Mapping[str, Averager],
) -> Callable[[TrainState], TrainState]:
    """A ``post_update`` for :func:`cljax.train.make_step` that updates averages in the step.

    Each ``state.methods[name]`` is replaced by the new state of
    ``averagers[name].update(state.params, state.methods[name], step=state.step)`` after the
    optimizer update, inside the jitted, donated step. With ``make_step(nonfinite="skip")``
    a skipped step leaves the averages unchanged too.

    Args:
      averagers: method-state names mapped to averagers.

    Returns:
      ``post_update(state) -> state``.

    Raises:
      ValueError: (at trace time) if ``state.methods`` lacks one of the names.

    Example:
      >>> avgs = {"ema": ema(decay=0.999)}  # doctest: +SKIP
      >>> step = make_step(loss_fn, post_update=averaging_hook(avgs))  # doctest: +SKIP
    """
    averagers = dict(averagers)

    def post_update(state: TrainState) -> TrainState:
        methods = dict(state.methods)
        for name, av in averagers.items():
            if name not in methods:
                raise ValueError(
                    f"averaging_hook: state.methods has no {name!r} (has {sorted(methods)}); "
                    "create the state with methods=init_averages(averagers, params)"
                )
            _, methods[name] = av.update(state.params, methods[name], step=state.step)
        return state.replace(methods=methods)

    return post_update


def averaging_next_task(
    state: TrainState,
    averager: Averager,
    *,
    name: str,
    reset_optimizer: bool = True,
) -> TrainState:
    """The between-task hand-over: the next task starts from the average.

    ZSCL saves its weight-ensemble model at the end of a task and starts the next task
    from it, with a fresh optimizer, a fresh ensemble initialised at those weights, and
    (when used) an L2 anchor at those weights (Zheng et al., ICCV 2023; github.com/Thunderbeee/ZSCL). This function
    does the first three; an anchor is a method state of its own.

    Args:
      state: the train state at the end of a task.
      averager: the averager whose state is ``state.methods[name]``.
      name: the key of the average in ``state.methods``.
      reset_optimizer: re-initialise ``opt_state`` (the reference builds a new AdamW
        per task).

    Returns:
      The state with ``params`` = the average (storage dtypes kept), a re-initialised
      average at those params, and (optionally) a fresh optimizer state. ``step`` is kept.

    Raises:
      ValueError: if ``state.methods`` has no ``name``.

    Example:
      >>> state = averaging_next_task(state, we, name="we")  # doctest: +SKIP

    References:
      Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of
      Vision-Language Models", ICCV 2023.
    """
    if name not in state.methods:
        raise ValueError(f"averaging_next_task: state.methods has no {name!r}")
    params = average_params(state.methods[name], state.params)
    methods = {**state.methods, name: averager.init(params)}
    new = state.replace(params=params, methods=methods)
    if reset_optimizer:
        new = new.replace(opt_state=state.tx.init(params))
    return commit_arrays(new)  # as the step's outputs are: the next step does not recompile
