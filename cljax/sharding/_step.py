"""Sharded train states and steps, and data-parallel gradients of small arguments.

After big_vision's ``train.py``: the state's shapes come from ``jax.eval_shape``, its
shardings from the rules of :mod:`cljax.sharding`, and one ``jit`` with explicit in and out
shardings runs the step; XLA inserts the collectives (Xu et al., "GSPMD", 2021).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax.sharding._mesh import (
    REPLICATED,
    AxisNames,
    PartitionRules,
    _axes,
    _axis_size,
    _shape,
    check_batch,
    named_shardings,
    replicated,
)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (a restore target).

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape(init)``).
      shardings: a matching tree of shardings (or one sharding for every leaf).

    Returns:
      The abstract tree, e.g. the target of ``CheckpointManager.restore`` onto this mesh.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=shardings), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(_shape(x), x.dtype, sharding=s), tree, shardings
    )


def create_sharded_state(
    init_fn: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    rules: PartitionRules = (),
    default: PartitionSpec | str | None = REPLICATED,
    fsdp_axis: AxisNames = "data",
    min_size: int = 0,
) -> tuple[Any, Any]:
    """Builds a state directly in its sharded layout: shapes first, then a sharded init.

    ``jax.eval_shape`` gives the state's shapes without allocating it, the rules give its
    shardings, and ``jax.jit(init_fn, out_shardings=...)`` materialises every leaf on its
    devices, so no device ever holds the whole unsharded state.

    Args:
      init_fn: ``init_fn(*args) -> state`` (a :class:`cljax.train.TrainState` or any tree);
        non-array configuration (the optimizer) is closed over.
      *args: arrays for ``init_fn`` (a PRNG key, example inputs).
      mesh: the mesh.
      rules: ordered ``(regex, PartitionSpec | FSDP | None)`` pairs on the state's paths
        (``params/...``, ``opt_state/...``, ``methods/...``).
      default: value for leaves no rule matches; :data:`FSDP` shards every large leaf.
      fsdp_axis: the axis :data:`FSDP` shards over.
      min_size: leaves with fewer elements stay replicated under :data:`FSDP`.

    Returns:
      ``(state, shardings)``: the state, and the tree of its shardings (for
      :func:`sharded_step` and checkpoint restores).

    Raises:
      ValueError: as :func:`partition_specs`.

    Example:
      >>> init = lambda key: TrainState.create(model.init(key, x), optax.adam(1e-3), key)
      >>> state, sh = create_sharded_state(init, jax.random.key(0), mesh=mesh, default=FSDP)
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = named_shardings(
        abstract, mesh, rules, default, fsdp_axis=fsdp_axis, min_size=min_size
    )
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def sharded_step(
    step_fn: Callable[[Any, Any], tuple[Any, Any]],
    state_shardings: Any,
    batch_shardings: Any,
    *,
    donate: bool = True,
    check: bool = True,
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Jits ``step_fn(state, batch) -> (state, metrics)`` with explicit shardings.

    The state comes in and goes out with ``state_shardings`` (donated, so it is updated in
    place), the batch comes in with ``batch_shardings``, and the metrics come out
    replicated. The step's gradients are means over the global batch, whatever the mesh:
    ``jit`` inserts the all-reduce (data parallel) or reduce-scatter (FSDP) itself.

    Args:
      step_fn: an un-jitted step, e.g. ``cljax.train.make_step(loss_fn, jit=False)``. A
        step built with ``nonfinite="raise"`` (marked ``step_fn.nonfinite == "raise"``)
        skips a non-finite update inside the compiled program, and the returned step
        raises :class:`cljax.train.NonFiniteError` naming it
        (:func:`cljax.train.raise_on_nonfinite`).
      state_shardings: the state's shardings (from :func:`create_sharded_state`).
      batch_shardings: the batch's sharding (:func:`batch_sharding`), or a tree of them.
      donate: donate the input state.
      check: check the batch's leading size against the batch sharding before each call
        (shapes only, no device sync), for a clear error instead of XLA's.

    Returns:
      The jitted step.

    Example:
      >>> step = sharded_step(make_step(loss_fn, jit=False), state_sh, batch_sharding(mesh))
    """
    leaves = jax.tree_util.tree_leaves(
        state_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    if not leaves or not isinstance(leaves[0], NamedSharding):
        raise ValueError("state_shardings must be a non-empty tree of NamedSharding")
    mesh = cast(Mesh, leaves[0].mesh)  # typed Mesh | AbstractMesh; shardings live on a Mesh
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
    raising = getattr(step_fn, "nonfinite", None) == "raise"
    if not (check and isinstance(batch_shardings, NamedSharding) and batch_shardings.spec):
        if raising:
            from cljax.train import raise_on_nonfinite

            return raise_on_nonfinite(jitted)
        return jitted
    axis = batch_shardings.spec[0]

    @functools.wraps(step_fn)
    def step(state: Any, batch: Any) -> tuple[Any, Any]:
        check_batch(batch, mesh, axis, local=False)
        return jitted(state, batch)

    step.lower = jitted.lower  # type: ignore[attr-defined]
    if raising:
        from cljax.train import raise_on_nonfinite

        return raise_on_nonfinite(step)
    return step


def data_parallel_value_and_grad(
    loss_fn: Callable[..., Any],
    mesh: Mesh,
    *,
    axis: AxisNames = "data",
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``value_and_grad`` of ``loss_fn(x, batch, *rest)`` that all-reduces only the gradient of x.

    Each device differentiates the mean loss of its own slice of the batch and the results
    are averaged over ``axis`` (``pmean`` inside ``jax.shard_map``): the gradient is the
    global-batch gradient (slices are equal, so the mean of slice means is the global mean),
    and only ``x``'s gradient crosses the wire. Under plain ``jit``, XLA all-reduces the
    batch contraction where it happens, e.g. the full parameter cotangent ``dL/dθ`` of an
    aTLAS step before the per-block dot products ``<dL/dθ_b, τ_t,b>``; here the reduction
    is of the T x B coefficient gradient alone. Use it when ``x`` is much smaller than the
    model (aTLAS coefficients, a learned soup's weights, a head) and ``rest`` is replicated.

    Args:
      loss_fn: ``loss_fn(x, batch, *rest) -> loss`` (or ``(loss, aux)`` with ``has_aux``),
        a mean over the batch's examples.
      mesh: the mesh.
      axis: the mesh axis (or axes) the batch is split over.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``aux`` is averaged too.

    Returns:
      ``fn(x, batch, *rest) -> (value, grad)``, to call inside ``jit``; ``x`` and ``rest``
      enter replicated, the batch split over ``axis``; outputs are replicated.

    Raises:
      ValueError: if ``axis`` is not an axis of ``mesh``.

    Example:
      >>> vg = data_parallel_value_and_grad(
      ...     lambda c, b, p0, tv: loss(atlas.compose(p0, tv, c), b), mesh)
      >>> loss_value, coef_grad = vg(coefs, batch, pretrained, task_vectors)
    """
    _axis_size(mesh, axis, f"data_parallel_value_and_grad {axis=}")
    names = _axes(axis)
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def local(x: Any, batch: Any, *rest: Any) -> Any:
        return jax.lax.pmean(vg(x, batch, *rest), names)

    def fn(x: Any, batch: Any, *rest: Any) -> Any:
        mapped = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(axis), *[PartitionSpec()] * len(rest)),
            out_specs=PartitionSpec(),
            check_vma=False,
        )
        return mapped(x, batch, *rest)

    return fn
