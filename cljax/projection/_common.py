"""Shared plumbing of the projection transforms: target selection by path rules, state lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax import tree as ct

__all__ = ["check_finite_inputs", "find_state", "map_state", "select_targets"]


def select_targets(
    params: Any,
    targets: ct.Rules,
    *,
    method: str,
    allowed_ndim: tuple[int, ...] = (2,),
) -> tuple[str, ...]:
    """Paths of the leaves selected by boolean path rules, validated.

    Args:
      params: the parameter tree (or any tree of its structure with shaped leaves).
      targets: ordered ``(regex, bool)`` rules, first match wins, default False.
      method: name used in error messages.
      allowed_ndim: ranks a target may have.

    Returns:
      The selected paths, in flattening order.

    Raises:
      ValueError: if no leaf is selected, a rule selects no leaf (naming it and a few
        paths), or a selected leaf has a rank not in ``allowed_ndim``.
    """
    targets = list(targets)
    mask = ct.rule_mask(params, targets, default=False, allow_unused=True)
    chosen = []
    for (path, leaf), (_, sel) in zip(
        ct.leaves_with_paths(params), ct.leaves_with_paths(mask), strict=True
    ):
        if not sel:
            continue
        if jnp.ndim(leaf) not in allowed_ndim:
            raise ValueError(
                f"{method}: target {path!r} has shape {jnp.shape(leaf)}; only "
                f"{'/'.join(map(str, allowed_ndim))}-D parameters can be projected "
                "(exclude it with a (regex, False) rule before the matching one)"
            )
        chosen.append(path)
    if not chosen:
        raise ValueError(
            f"{method}: the target rules {targets!r} select no parameter; paths are e.g. "
            f"{ct.paths(params)[:4]}"
        )
    try:
        ct.rule_mask(params, targets, default=False)  # every rule must select something
    except ValueError as e:
        raise ValueError(f"{method}: target {e}") from None
    return tuple(chosen)


def check_finite_inputs(arrays: Any, *, where: str, what: str) -> None:
    """Raises ``ValueError`` if a between-task hook's input holds NaN or Inf.

    An SVD of a non-finite matrix returns NaN bases, which would then zero or corrupt every
    later update of the layer; the hooks refuse them instead. Traced arrays (a hook called
    under ``jit``) cannot be inspected and are let through.

    Args:
      arrays: per target, in target order.
      where: the hook's name, for the message.
      what: what the arrays are (``"representation"``, ``"weight"``).
    """
    for i, x in enumerate(arrays):
        if isinstance(x, jax.core.Tracer):
            continue
        arr = np.asarray(jnp.asarray(x, jnp.float32))
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:
            raise ValueError(
                f"{where}: {what} {i} (shape {arr.shape}) holds {bad} non-finite value(s); "
                "check the data and the model that produced it (a diverged task?)"
            )


def _by_path(tree: Any) -> dict[str, Any]:
    return dict(ct.leaves_with_paths(tree))


def find_state(opt_state: Any, cls: type) -> list[Any]:
    """All sub-states of type ``cls`` inside an (e.g. chained) optax state, in tree order."""
    found = []
    jax.tree.map(
        lambda x: found.append(x) if isinstance(x, cls) else None,
        opt_state,
        is_leaf=lambda x: isinstance(x, cls),
    )
    return found


def map_state(opt_state: Any, cls: type, fn: Callable[[Any], Any]) -> Any:
    """Replaces every sub-state of type ``cls`` of an optax state by ``fn(sub_state)``.

    This is how a between-task hook reaches the state of its transform inside an
    ``optax.chain``: ``state.replace(opt_state=map_state(state.opt_state, GPMState, hook))``.

    Raises:
      ValueError: if the state holds no sub-state of type ``cls``.
    """
    if not find_state(opt_state, cls):
        raise ValueError(f"the optimizer state holds no {cls.__name__}")
    return jax.tree.map(
        lambda x: fn(x) if isinstance(x, cls) else x,
        opt_state,
        is_leaf=lambda x: isinstance(x, cls),
    )
