"""One protocol for every stateful method: optax's ``(init, update)`` pair.

A stateful method in cljax -- a gradient projection, a weight average, a loss weighting,
a continual-learning method -- is built by a **factory** that takes the hyperparameters
(keyword-only) and returns a ``NamedTuple`` of pure functions, as
``optax.GradientTransformationExtraArgs``:

* the first is ``init(...) -> state``: the method's state, a ``NamedTuple`` of arrays with a
  structure fixed for the whole run (so it lives in a donated, jitted
  :class:`cljax.train.TrainState` and restores from a checkpoint into that structure);
* ``update(inputs, state, /, **extra) -> (outputs, new_state)`` in optax's order: what the
  method works on first, its state second, per-step inputs (``step``, ``key``) as keywords,
  and the transformed inputs returned beside the new state. Jit-able.

What changes over time lives in the state; hyperparameters are closed over by the factory;
the functions keep no Python-side state, so a method object can be reused across runs.

| kind | example factory | ``update`` | outputs |
|---|---|---|---|
| projection | :func:`cljax.projection.gpm` | ``update(updates, state, params)`` | the projected updates |
| weight average | :func:`cljax.averaging.ema` | ``update(params, state, *, step)`` | the new average |
| loss weighting | :func:`cljax.mtl.dwa` | ``update(losses, state, *, key)`` | the weighted losses |
| continual method | :func:`cljax.continual.ewc` | ``update(params, state, *, step)`` | the parameters |

Two kinds carry more than the pair, each for a reason the pair cannot hold:

* a **loss weighting** (:class:`cljax.mtl.LossWeighting`) also has ``weights(state, key)``:
  the weights multiply the task losses *before* the gradient is taken, while ``update``
  needs the step's losses, which exist only *after* the forward pass. A single ``update``
  would either apply the weights a step late or run the forward pass twice.
* a **continual method** (:class:`cljax.continual.Method`) also has the hooks of a task
  sequence: a loss term, ``begin_task`` / ``end_task`` around each task, and how it wraps
  the optimiser (a projection is an optax transform chained after the base optimiser).

**Between-task hooks** are library functions named ``<method>_next_task(state, data, *,
hyperparameters) -> state``: :func:`cljax.projection.gpm_next_task`,
:func:`cljax.projection.coso_next_task`, :func:`cljax.projection.osft_next_task`,
:func:`cljax.losses.ewc_next_task`, :func:`cljax.averaging.averaging_next_task`. A
continual method calls them from its ``begin_task`` or ``end_task``.

A method without state returns :data:`EmptyState` ``()`` from ``init``, as optax's stateless
transforms do.
"""

from __future__ import annotations

from optax import EmptyState

__all__ = ["EmptyState"]
