"""The functional train state every cljax runner carries."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState"]


def _concrete(x: Any) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def _copy_arrays(tree: Any, *, only_repeated: bool = False, seen: set | None = None) -> Any:
    """Copies the concrete ``jax.Array`` leaves of ``tree`` onto their own shardings.

    With ``only_repeated``, copies only the leaves that are the same array as an earlier leaf
    or as one in ``seen`` (ids); tracers and non-array leaves are kept as they are.
    """
    seen = set() if seen is None else seen
    leaves, treedef = jax.tree.flatten(tree)
    todo = []
    for i, x in enumerate(leaves):
        if _concrete(x):
            if not only_repeated or id(x) in seen:
                todo.append(i)
            seen.add(id(x))
    if todo:  # one batched device-to-device copy, same shardings, new buffers
        copies = jax.device_put(
            [leaves[i] for i in todo], [leaves[i].sharding for i in todo], may_alias=False
        )
        for i, c in zip(todo, copies, strict=True):
            leaves[i] = c
    return jax.tree.unflatten(treedef, leaves)


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding | None:
    """A replicated sharding on ``sharding``'s devices, or ``None`` where none is known."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(), memory_kind=sharding.memory_kind
        )
    if len(sharding.device_set) == 1:
        (device,) = sharding.device_set
        return jax.sharding.SingleDeviceSharding(device, memory_kind=sharding.memory_kind)
    return None


def commit_arrays(tree: Any) -> Any:
    """Commits the uncommitted concrete ``jax.Array`` leaves of ``tree`` to devices.

    A jitted step compiles for its arguments' shardings, and an uncommitted argument has
    none: the first step, fed the fresh scalars of ``create`` (``step``, ``skipped``, an
    optimizer's count), would compile for them, and every later step, fed that step's
    committed outputs, would compile again. Committing them here makes the first step's
    arguments look like every later step's. Each uncommitted leaf is placed, replicated,
    on the devices of the first committed leaf (its own device where there is none), which
    is where ``jit`` would put it; without a copy where it already lives there. An array
    that appears twice stays one array (the step's donation check relies on it).
    """
    leaves, treedef = jax.tree.flatten(tree)
    todo = [i for i, x in enumerate(leaves) if _concrete(x) and not x.committed]
    if not todo:
        return tree
    home = next((x.sharding for x in leaves if _concrete(x) and x.committed), None)
    if home is not None:
        home = _replicated(home)
        if home is None:  # an unknown multi-device layout: leave the placement to jit
            return tree
    unique = list({id(leaves[i]): leaves[i] for i in todo}.values())  # one array, one result
    targets = [x.sharding if home is None else home for x in unique]
    done = {id(x): y for x, y in zip(unique, jax.device_put(unique, targets), strict=True)}
    for i in todo:
        leaves[i] = done[id(leaves[i])]
    return jax.tree.unflatten(treedef, leaves)


class TrainState(struct.PyTreeNode):
    """Step counter, parameters, optimizer state, RNG and the states of cljax methods.

    ``methods`` is a dict of method states keyed by name (an EMA average, a projection
    memory, a frozen anchor): pytrees that live and are donated with the state, updated
    inside the jitted step or by between-task hooks.

    Attributes:
      step: int32 scalar, number of optimizer updates applied.
      params: any pytree of arrays.
      opt_state: the optax state of ``tx``.
      key: a PRNG key, split once per step.
      methods: dict of method states.
      tx: the optax transformation (static, not a pytree node).
      skipped: int32 scalar, steps skipped for non-finite gradients.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array
    methods: dict[str, Any] = struct.field(default_factory=dict)
    skipped: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        params: Any,
        tx: optax.GradientTransformation,
        key: jax.Array | int = 0,
        methods: dict[str, Any] | None = None,
        *,
        copy: bool = True,
    ) -> TrainState:
        """Builds a state at step 0 with ``tx.init(params)``.

        A step built by :func:`~cljax.train.make_step` donates the state it is given, which
        deletes its arrays. So that the caller's arrays survive (the pretrained weights
        ``params`` came from, an anchor in ``methods``, ``key``), the state owns
        copies of them: one device-to-device copy, on the arrays' own shardings; arrays that
        ``tx.init`` hands back from ``params`` (lookahead's slow weights, say) are copied
        too, so no buffer is donated twice. Inside ``jit`` or ``eval_shape`` nothing is
        copied (the traced result is fresh anyway).

        Every array of the state is committed to devices (an uncommitted one, such as
        a fresh counter or a key made from a seed, replicated on the devices of the
        parameters), so the first call of a jitted step sees the same argument shardings
        as the later ones and the step compiles once.

        Args:
          params: the parameters to train.
          tx: an optax transformation.
          key: a PRNG key or an integer seed.
          methods: initial method states.
          copy: copy the arrays given, as above. ``False`` saves the memory of one copy of
            them, and then the first donating step deletes the caller's arrays.

        Example::

          state = TrainState.create(theta0, optax.adam(1e-3))
          state, metrics = make_step(loss_fn)(state, batch)
          theta0  # still readable; state.params is the trained copy
        """
        if isinstance(key, int):
            key = jax.random.key(key)
        methods = dict(methods or {})
        params, key, methods = commit_arrays((params, key, methods))
        if copy:
            params, key, methods = _copy_arrays((params, key, methods))
        state = cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            key=key,
            methods=methods,
            skipped=jnp.zeros((), jnp.int32),
            tx=tx,
        )
        if copy:
            state = _copy_arrays(state, only_repeated=True)
        return commit_arrays(state)

    def apply_gradients(self, grads: Any, **extra_args: Any) -> TrainState:
        """One optimizer update; extra keyword args go to ``tx.update`` (extra-args transforms)."""
        if extra_args:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
        else:
            updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)
