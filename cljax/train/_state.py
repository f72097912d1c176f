"""The functional train state every cljax runner carries."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState"]


class TrainState(struct.PyTreeNode):
    """Step counter, parameters, optimizer state, RNG and the states of cljax methods.

    ``methods`` is a dict of method states keyed by name (an EMA average, a projection
    memory, a frozen anchor): pytrees that live and are donated with the state, updated
    inside the jitted step or by between-task hooks.

    Attributes:
      step: int32 scalar, number of optimizer updates applied.
      params: any pytree of arrays.
      opt_state: the optax state of ``tx``.
      rng: a PRNG key, split once per step.
      methods: dict of method states.
      tx: the optax transformation (static, not a pytree node).
      skipped: int32 scalar, steps skipped for non-finite gradients.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    methods: dict[str, Any] = struct.field(default_factory=dict)
    skipped: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        params: Any,
        tx: optax.GradientTransformation,
        rng: jax.Array | int = 0,
        methods: dict[str, Any] | None = None,
    ) -> TrainState:
        """Builds a state at step 0 with ``tx.init(params)``.

        Args:
          params: the parameters to train.
          tx: an optax transformation.
          rng: a PRNG key or an integer seed.
          methods: initial method states.
        """
        if isinstance(rng, int):
            rng = jax.random.key(rng)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            methods=dict(methods or {}),
            skipped=jnp.zeros((), jnp.int32),
            tx=tx,
        )

    def apply_gradients(self, grads: Any, **extra_args: Any) -> TrainState:
        """One optimizer update; extra keyword args go to ``tx.update`` (extra-args transforms)."""
        if extra_args:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
        else:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)
