"""Meshes, partition rules, sharded train states and multi-host initialisation.

Sharding in cljax is data. A :class:`jax.sharding.Mesh` is built from a spec such as
``{"data": -1}`` or ``{"data": 4, "model": 2}``; a tree of :class:`NamedSharding` is built
from ordered ``(regex, PartitionSpec)`` rules on the ``/``-joined leaf paths (first match
wins, as every cljax path rule); leaves no rule matches get a default, either replicated or
the FSDP rule (shard the largest dimension the mesh axis divides). Library functions take the
mesh or the shardings as arguments; only :func:`make_mesh` falls back to ``jax.devices()``,
and only when no devices are given.

A train step runs on a mesh in three moves (after big_vision's ``train.py``)::

    mesh = make_mesh({"data": -1})
    init = lambda rng: TrainState.create(model.init(rng, x0), optax.adam(1e-3), rng)
    state, state_sh = create_sharded_state(init, jax.random.key(0), mesh=mesh, default=FSDP)
    step = sharded_step(make_step(loss_fn, jit=False), state_sh, batch_sharding(mesh))
    for batch in batches:
        state, metrics = step(state, shard_batch(batch, mesh))

Every cljax method is a pure pytree transform, so the same code runs data-parallel (params
replicated, batch split) or fully sharded (params, optimizer and method states sharded by
the FSDP rule, batch split), and XLA inserts the collectives. :func:`hlo_collectives` lists
the collectives a compiled function holds, with their bytes, to check what crosses the wire.

Multi-host runs call :func:`initialize_distributed` once per process (explicit coordinator
arguments, or the environment's auto-detection on TPU pods and SLURM), then build the mesh
over all processes' devices; every process feeds its own slice of the batch
(:func:`shard_batch`) and only process 0 writes files and logs (:func:`is_primary`,
:func:`on_primary`, :func:`primary_print`, :func:`setup_logging`).

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", SC 2020 (the FSDP sharding of params, gradients and optimizer states).
  Xu et al., "GSPMD: General and Scalable Parallelization for ML Computation Graphs", 2021.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax import tree as ct

__all__ = [
    "FSDP",
    "REPLICATED",
    "Collective",
    "DistributedInfo",
    "PartitionRules",
    "abstract_with_shardings",
    "batch_sharding",
    "check_batch",
    "cluster_environment",
    "collective_bytes",
    "create_sharded_state",
    "data_parallel_value_and_grad",
    "describe_shardings",
    "fsdp_spec",
    "hlo_collectives",
    "initialize_distributed",
    "is_primary",
    "make_mesh",
    "named_shardings",
    "on_primary",
    "partition_specs",
    "primary_print",
    "replicated",
    "setup_logging",
    "shard_batch",
    "sharded_step",
    "stacked_shardings",
]

FSDP = "fsdp"
"""Rule value (or ``default``) meaning: shard the leaf with :func:`fsdp_spec`."""

REPLICATED = None
"""Rule value (or ``default``) meaning: replicate the leaf on every device."""

PartitionRules = Sequence[tuple[str, PartitionSpec | str | None]]
"""Ordered ``(regex, value)`` pairs; a value is a ``PartitionSpec``, :data:`FSDP` or ``None``."""

AxisNames = str | tuple[str, ...]


# ----------------------------------------------------------------------------- meshes


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh with named axes from a ``{name: size}`` spec.

    One size may be ``-1``: that axis takes the devices the others leave. The axes are of
    the automatic kind (``AxisType.Auto``), so ``jit`` with shardings propagates them, as
    in JAX before explicit sharding (newer ``jax.make_mesh`` defaults to explicit axes).

    Args:
      spec: axis names to sizes, in mesh order (``{"data": 4, "model": 2}``).
      devices: the devices to lay out, all of them used. Defaults to ``jax.devices()``
        (every device of every process), the only place cljax looks devices up itself.

    Returns:
      A :class:`jax.sharding.Mesh`.

    Raises:
      ValueError: for an empty spec, a size that is neither positive nor ``-1``, more than
        one ``-1``, or sizes whose product does not equal (or, with ``-1``, divide) the
        number of devices.

    Example:
      >>> mesh = make_mesh({"data": -1, "model": 2}, jax.devices()[:8])
      >>> dict(mesh.shape)
      {'data': 4, 'model': 2}
    """
    spec = dict(spec)
    if not spec:
        raise ValueError(f"mesh {spec=} must name at least one axis")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("make_mesh needs at least one device")
    for name, size in spec.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mesh axis name {name!r} must be a non-empty string")
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; it must be >= 1 or -1")
    free = [k for k, v in spec.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {spec=} has more than one -1 axis ({free})")
    fixed = math.prod(v for v in spec.values() if v != -1)
    if free:
        if n % fixed:
            raise ValueError(
                f"mesh {spec=}: the fixed axes need a multiple of {fixed} devices, "
                f"but {n} devices do not divide by {fixed}"
            )
        spec[free[0]] = n // fixed
    elif fixed != n:
        raise ValueError(f"mesh {spec=} needs {fixed} devices, but {n} devices were given")
    names = tuple(spec)
    shape = tuple(int(spec[k]) for k in names)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
    except Exception:  # device topologies make_mesh cannot lay out: plain row-major order
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), names, axis_types=auto)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _axes(axis: AxisNames | None) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _axis_size(mesh: Mesh, axis: AxisNames | None, where: str) -> int:
    names = _axes(axis)
    for a in names:
        if a not in mesh.shape:
            raise ValueError(
                f"{where} names mesh axis {a!r}, but the mesh has axes {tuple(mesh.axis_names)}"
            )
    return math.prod(mesh.shape[a] for a in names)


# ----------------------------------------------------------------------------- partition rules


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def fsdp_spec(
    shape: Sequence[int], mesh: Mesh, axis: AxisNames = "data", *, min_size: int = 0
) -> PartitionSpec:
    """The FSDP partition of one array: its largest dimension that ``axis`` divides.

    Ties go to the later dimension (the output features of a Flax kernel), so a square
    kernel and its gradient and Adam moments all shard alike. Arrays with no dimension
    divisible by the axis size, or with fewer than ``min_size`` elements, are replicated.

    Args:
      shape: the array's shape.
      mesh: the mesh.
      axis: the mesh axis (or tuple of axes) to shard over.
      min_size: arrays smaller than this stay replicated (biases, norms).

    Returns:
      A ``PartitionSpec`` with ``axis`` on at most one dimension.

    Raises:
      ValueError: if ``axis`` is not an axis of ``mesh``.

    Example:
      >>> fsdp_spec((6, 16), make_mesh({"data": 8}))
      PartitionSpec(None, 'data')
    """
    size = _axis_size(mesh, axis, "fsdp_spec")
    shape = tuple(shape)
    if size == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    dims = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
    if not dims:
        return PartitionSpec()
    best = max(dims, key=lambda i: (shape[i], i))
    spec: list[Any] = [None] * len(shape)
    spec[best] = axis
    return PartitionSpec(*spec)


def _check_spec(spec: PartitionSpec, mesh: Mesh, where: str) -> None:
    for entry in spec:
        for a in _axes(entry):
            if a not in mesh.shape:
                raise ValueError(
                    f"{where} names mesh axis {a!r}, but the mesh has axes {tuple(mesh.axis_names)}"
                )


def _validate_leaf(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"{where}: {spec} has {len(spec)} entries, more than the dims of {shape}")
    used: list[str] = []
    for dim, entry in enumerate(spec):
        names = _axes(entry)
        used += names
        k = math.prod(mesh.shape[a] for a in names)
        if k > 1 and shape[dim] % k:
            raise ValueError(
                f"{where}: dimension {dim} of shape {shape} has size {shape[dim]}, not "
                f"divisible by mesh axes {names} of size {k}"
            )
    if len(set(used)) != len(used):
        raise ValueError(f"{where}: {spec} uses a mesh axis twice")


def _resolve(
    value: Any, shape: tuple[int, ...], mesh: Mesh, fsdp_axis: AxisNames, min_size: int, where: str
) -> PartitionSpec:
    if value is None:
        return PartitionSpec()
    if isinstance(value, str):
        if value != FSDP:
            raise ValueError(f"{where} has value {value!r}; use a PartitionSpec, FSDP or None")
        return fsdp_spec(shape, mesh, fsdp_axis, min_size=min_size)
    if not isinstance(value, PartitionSpec):
        raise ValueError(f"{where} has value {value!r}; use a PartitionSpec, FSDP or None")
    _validate_leaf(value, shape, mesh, where)
    return value


def partition_specs(
    tree: Any,
    mesh: Mesh,
    rules: PartitionRules = (),
    default: PartitionSpec | str | None = REPLICATED,
    *,
    fsdp_axis: AxisNames = "data",
    min_size: int = 0,
) -> Any:
    """A ``PartitionSpec`` for every leaf of ``tree``, from ordered path rules.

    Each leaf takes the value of the first rule whose regex ``re.search``-matches its
    ``/``-joined path (the convention of :func:`cljax.tree.rule_values`), else ``default``.
    A value is a ``PartitionSpec``, :data:`FSDP` (shard with :func:`fsdp_spec`) or ``None``
    (replicate). Optimizer states carry the parameter paths inside them
    (``opt_state/0/mu/dense/kernel``), so rules ending in ``kernel$`` shard the Adam
    moments like the kernel.

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
      mesh: the mesh the specs refer to.
      rules: ordered ``(regex, value)`` pairs.
      default: the value of leaves no rule matches.
      fsdp_axis: the mesh axis (or axes) :data:`FSDP` shards over.
      min_size: leaves with fewer elements stay replicated under :data:`FSDP`.

    Returns:
      A tree of ``PartitionSpec`` with the structure of ``tree``.

    Raises:
      ValueError: if a rule names an axis the mesh lacks (checked for every rule, matched or
        not), gives a leaf more entries than it has dimensions, or shards a dimension the
        mesh axes do not divide; or for a malformed rule.

    Example:
      >>> rules = [(r"head/", None), (r"kernel$", PartitionSpec(None, "model"))]
      >>> specs = partition_specs(params, mesh, rules, default=FSDP)
    """
    rules = list(rules)
    indexed = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise ValueError(f"rules[{i}]={rule!r} must be a (regex, PartitionSpec) pair")
        rx, value = rule
        if isinstance(value, PartitionSpec):
            _check_spec(value, mesh, f"rules[{i}] ({rx!r}, {value})")
        indexed.append((rx, i))
    if isinstance(default, PartitionSpec):
        _check_spec(default, mesh, f"default {default}")
    if default == FSDP or any(v == FSDP for _, v in rules):
        _axis_size(mesh, fsdp_axis, f"{fsdp_axis=}")
    which = ct.rule_values(tree, indexed, default=-1)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    which_flat = jax.tree_util.tree_leaves(which)
    out = []
    for (path, leaf), i in zip(flat, which_flat, strict=True):
        p = ct.path_str(path)
        if i < 0:
            value, where = default, f"default for {p!r}"
        else:
            value, where = rules[i][1], f"rules[{i}] ({rules[i][0]!r}) at {p!r}"
        out.append(_resolve(value, _shape(leaf), mesh, fsdp_axis, min_size, where))
    return jax.tree_util.tree_unflatten(treedef, out)


def named_shardings(
    tree: Any,
    mesh: Mesh,
    rules: PartitionRules = (),
    default: PartitionSpec | str | None = REPLICATED,
    *,
    fsdp_axis: AxisNames = "data",
    min_size: int = 0,
) -> Any:
    """A ``NamedSharding`` for every leaf of ``tree`` (see :func:`partition_specs`).

    Args:
      tree: a pytree of arrays or ``jax.ShapeDtypeStruct``.
      mesh: the mesh.
      rules: ordered ``(regex, PartitionSpec | FSDP | None)`` pairs.
      default: the value of leaves no rule matches (``None``: replicated; :data:`FSDP`).
      fsdp_axis: the mesh axis :data:`FSDP` shards over.
      min_size: leaves with fewer elements stay replicated under :data:`FSDP`.

    Returns:
      A tree of ``NamedSharding`` with the structure of ``tree``; use it as ``jit``'s
      ``in_shardings``/``out_shardings`` or with ``jax.device_put``.

    Raises:
      ValueError: as :func:`partition_specs`.

    Example:
      >>> params = jax.device_put(params, named_shardings(params, mesh, default=FSDP))
    """
    specs = partition_specs(tree, mesh, rules, default, fsdp_axis=fsdp_axis, min_size=min_size)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def stacked_shardings(
    stacked: Any,
    mesh: Mesh,
    *,
    task_axis: AxisNames | None = "data",
    rules: PartitionRules = (),
    default: PartitionSpec | str | None = REPLICATED,
    fsdp_axis: AxisNames = "data",
    min_size: int = 0,
) -> Any:
    """Shardings of a stacked tree (leading task axis of size T on every leaf).

    The leading axis goes on ``task_axis`` (each device holds T / size whole task vectors;
    a sum over tasks becomes one reduction across devices); the remaining dimensions follow
    ``rules``/``default`` as for one unstacked tree. With ``task_axis=None`` and
    ``default=FSDP`` every task vector is sharded like the parameters, so element-wise
    merges (task arithmetic, TIES's elect and disjoint mean) need no communication.

    Args:
      stacked: a stacked pytree (arrays or ``jax.ShapeDtypeStruct``).
      mesh: the mesh.
      task_axis: the mesh axis for the task dimension, or ``None`` to leave it unsharded.
      rules: rules for the per-task dimensions (on the paths of the unstacked tree).
      default: default for the per-task dimensions.
      fsdp_axis: the mesh axis :data:`FSDP` shards over (must differ from ``task_axis``).
      min_size: as in :func:`partition_specs`.

    Returns:
      A tree of ``NamedSharding``.

    Raises:
      ValueError: if the leaves disagree on T, T is not divisible by the task axis size,
        or a per-task spec reuses the task axis.

    Example:
      >>> sh = stacked_shardings(task_vectors, mesh, task_axis="data")
      >>> task_vectors = jax.device_put(task_vectors, sh)
    """
    t = ct.num_stacked(stacked)
    k = _axis_size(mesh, task_axis, f"{task_axis=}")
    if task_axis is not None and t % k:
        raise ValueError(
            f"the stacked tree holds T={t} trees, not divisible by mesh axis "
            f"{task_axis!r} of size {k}; use task_axis=None (and default=FSDP)"
        )
    inner = jax.tree.map(lambda x: jax.ShapeDtypeStruct(_shape(x)[1:], x.dtype), stacked)
    specs = partition_specs(inner, mesh, rules, default, fsdp_axis=fsdp_axis, min_size=min_size)
    lead = task_axis if task_axis is not None else None
    taken = set(_axes(task_axis))

    def build(spec: PartitionSpec) -> NamedSharding:
        if taken & {a for e in spec for a in _axes(e)}:
            raise ValueError(
                f"per-task spec {spec} reuses the task axis {task_axis!r}; give the "
                "parameters another mesh axis (fsdp_axis=) or set task_axis=None"
            )
        return NamedSharding(mesh, PartitionSpec(lead, *spec))

    return jax.tree.map(build, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def describe_shardings(tree: Any, shardings: Any) -> str:
    """One line per leaf: path, shape, dtype and partition spec (to print what rules chose)."""
    lines = []
    sh_leaves = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    for (p, leaf), s in zip(ct.leaves_with_paths(tree), sh_leaves, strict=True):
        spec = getattr(s, "spec", s)
        lines.append(f"{p}  {_shape(leaf)} {getattr(leaf, 'dtype', '')}  {spec}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, axis: AxisNames = "data") -> NamedSharding:
    """The sharding of a batch: leading (example) dimension split over ``axis``.

    Raises:
      ValueError: if ``axis`` is not an axis of ``mesh``.
    """
    _axis_size(mesh, axis, f"batch_sharding {axis=}")
    return NamedSharding(mesh, PartitionSpec(axis))


def _mesh_processes(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def check_batch(batch: Any, mesh: Mesh, axis: AxisNames = "data", *, local: bool = False) -> int:
    """Checks that every leaf of ``batch`` has one leading size divisible by ``axis``.

    Args:
      batch: a pytree of arrays with a leading example dimension.
      mesh: the mesh.
      axis: the mesh axis (or axes) the batch is split over.
      local: whether ``batch`` is this process's slice (multi-host); the global size is
        then the local size times the number of processes the mesh spans.

    Returns:
      The global batch size.

    Raises:
      ValueError: naming the leaf, for a scalar leaf, disagreeing leading sizes, or a
        global batch size not divisible by the axis size.
    """
    k = _axis_size(mesh, axis, f"batch {axis=}")
    sizes = {}
    for p, leaf in ct.leaves_with_paths(batch):
        shape = _shape(leaf)
        if not shape:
            raise ValueError(f"batch leaf {p!r} is a scalar; batch leaves need a leading dim")
        sizes[p] = shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch leaves disagree on the batch size: {sizes}")
    n = next(iter(sizes.values()), 0)
    if local:
        n *= _mesh_processes(mesh)
    if n % k:
        first = next(iter(sizes), "")
        raise ValueError(
            f"batch leaf {first!r} has {n} examples (global), not divisible by mesh axis "
            f"{axis!r} of size {k}; use a batch size that is a multiple of {k}"
        )
    return n


def shard_batch(batch: Any, mesh: Mesh, axis: AxisNames = "data") -> Any:
    """Places a batch on the mesh, split over ``axis`` along its leading dimension.

    In a single process ``batch`` is the whole batch. In a multi-host run every process
    passes its own slice (its ``1 / process_count`` of the global batch, as a data loader
    sharded by ``jax.process_index()`` yields) and gets back a global array.

    Args:
      batch: a pytree of host arrays (numpy or jax) with a leading example dimension.
      mesh: the mesh.
      axis: the mesh axis (or axes) to split the batch over.

    Returns:
      The batch as global ``jax.Array`` s with :func:`batch_sharding`.

    Raises:
      ValueError: as :func:`check_batch`.

    Example:
      >>> batch = shard_batch({"x": x, "y": y}, mesh)
    """
    multi = _mesh_processes(mesh) > 1
    check_batch(batch, mesh, axis, local=multi)
    sharding = batch_sharding(mesh, axis)
    if not multi:
        return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


# ----------------------------------------------------------------------------- sharded states


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
      >>> init = lambda rng: TrainState.create(model.init(rng, x), optax.adam(1e-3), rng)
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


# ----------------------------------------------------------------------------- compiled HLO


class Collective(NamedTuple):
    """One collective of a compiled XLA program.

    Attributes:
      kind: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` or
        ``collective-permute``.
      shape: its result shape(s) as written in the HLO, e.g. ``"f32[16,8]"``.
      result_bytes: bytes of the result (the gathered array for an all-gather, the shard
        for a reduce-scatter).
      group_size: devices per replica group (1 if the HLO does not say).
      wire_bytes: bytes each device sends with a bandwidth-optimal (ring) algorithm:
        ``2 (n-1)/n S`` for an all-reduce of ``S`` bytes, ``(n-1)/n S`` for an all-gather
        with result ``S`` or an all-to-all, ``(n-1) s`` for a reduce-scatter with result
        ``s``, ``S`` for a permute.
    """

    kind: str
    shape: str
    result_bytes: int
    group_size: int
    wire_bytes: float


_COLLECTIVE_RE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|[\w]+\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?P<start>-start)?\("
)
_ARRAY_RE = re.compile(r"(\w+)\[([\d,]*)\]")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST_RE = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_MESH_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PARTITIONS_RE = re.compile(r"num_partitions=(\d+)")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1,
}  # fmt: skip


def _array_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY_RE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        out.append(n * _DTYPE_BYTES.get(dtype, 4))
    return out


def _group_size(line: str, default: int) -> int:
    """Devices per replica group, in any of the HLO spellings of ``replica_groups``."""
    m = _GROUPS_MESH_RE.search(line)  # mesh['a'=4,'b'=2] {'a'}
    if m:
        sizes = {k.strip("'\" "): int(v) for k, v in re.findall(r"([^,=]+)=(\d+)", m.group(1))}
        axes = [a.strip("'\" ") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in axes)
    m = _GROUPS_IOTA_RE.search(line)  # [num_groups,group_size]<=[n]
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST_RE.search(line)  # {{0,1,2,3},{4,5,6,7}}
    if m:
        return len([x for x in m.group(1).split(",") if x])
    return default  # replica_groups={}: one group of all devices


def hlo_collectives(compiled: Any) -> list[Collective]:
    """Lists the collectives of a compiled program, with their sizes.

    Args:
      compiled: ``jax.jit(f).lower(...).compile()``, or its ``as_text()``.

    Returns:
      One :class:`Collective` per collective instruction (async ``-start``/``-done`` pairs
      count once).

    Example:
      >>> c = jax.jit(f, in_shardings=..., out_shardings=...).lower(x).compile()
      >>> sum(c.wire_bytes for c in hlo_collectives(c) if c.kind == "all-gather")
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    parts = _PARTITIONS_RE.search(text)
    partitions = int(parts.group(1)) if parts else 1
    out = []
    for line in text.splitlines():
        m = _COLLECTIVE_RE.search(line)
        if not m:
            continue
        kind, shape = m.group("kind"), m.group("shape")
        sizes = _array_bytes(shape)
        if m.group("start") and shape.startswith("(") and kind != "all-reduce":
            sizes = sizes[len(sizes) // 2 :]  # (operands, results) of an async start
        size = sum(sizes)
        n = max(_group_size(line, default=partitions), 1)
        if kind == "all-reduce":
            wire = 2 * (n - 1) / n * size
        elif kind == "reduce-scatter":
            wire = (n - 1) * size
        elif kind == "collective-permute":
            wire = float(size)
        else:
            wire = (n - 1) / n * size
        out.append(Collective(kind, shape, size, n, wire))
    return out


def collective_bytes(compiled: Any) -> dict[str, float]:
    """Per-device wire bytes of a compiled program by collective kind (see :class:`Collective`)."""
    totals: dict[str, float] = {}
    for c in hlo_collectives(compiled):
        totals[c.kind] = totals.get(c.kind, 0.0) + c.wire_bytes
    return totals


# ----------------------------------------------------------------------------- multi-host


class DistributedInfo(NamedTuple):
    """Where this process stands after :func:`initialize_distributed`."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    cluster: str | None


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """Names the multi-process cluster this process runs in, or ``None``.

    Recognises what ``jax.distributed.initialize()`` auto-detects: a multi-host TPU slice
    (``TPU_WORKER_HOSTNAMES`` with several hosts, or Megascale), a SLURM job with several
    tasks, an Open MPI launch with several ranks, and an explicit ``JAX_COORDINATOR_ADDRESS``.

    Args:
      environ: the environment (default ``os.environ``).

    Returns:
      ``"tpu"``, ``"slurm"``, ``"mpi"``, ``"env"`` or ``None`` for a single process.
    """
    env = os.environ if environ is None else environ

    def count(key: str) -> int:
        try:
            return int(env.get(key, "1"))
        except ValueError:
            return 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if env.get("SLURM_JOB_ID") and max(count("SLURM_NTASKS"), count("SLURM_NPROCS")) > 1:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    return None


def _info(cluster: str | None) -> DistributedInfo:
    return DistributedInfo(
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
        cluster,
    )  # fmt: skip


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    auto: bool = True,
    initialization_timeout: int = 300,
) -> DistributedInfo:
    """Joins this process to a multi-process JAX runtime (once, before any computation).

    With ``coordinator_address``, ``num_processes`` and ``process_id`` it calls
    ``jax.distributed.initialize`` with them (every process the same address and count, its
    own id). Without them and with ``auto``, it lets JAX auto-detect the cluster when
    :func:`cluster_environment` finds one (TPU pod slices, SLURM, Open MPI), and otherwise
    stays a single process, so the same command runs on a laptop, a Colab TPU and a pod.
    Calling it again after a successful initialisation is a no-op.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordinator.
      num_processes: the number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local devices this process uses (e.g. one GPU per process).
      auto: auto-detect a cluster when the explicit arguments are absent.
      initialization_timeout: seconds to wait for all processes.

    Returns:
      A :class:`DistributedInfo`.

    Raises:
      ValueError: for a partial set of explicit arguments, ``num_processes < 1`` or a
        ``process_id`` out of range.

    Example:
      >>> info = initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)
      >>> mesh = make_mesh({"data": -1})   # all devices of both processes
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"{num_processes=} must be >= 1")
    if jax.distributed.is_initialized():
        return _info("initialized")
    explicit = [k for k, v in given.items() if v is not None]
    if explicit and num_processes == 1 and coordinator_address is None:
        if process_id not in (None, 0):
            raise ValueError(f"{process_id=} must be 0 with num_processes=1")
        return _info(None)
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            missing = [k for k, v in given.items() if v is None]
            raise ValueError(
                f"initialize_distributed got {explicit} but not {missing}; give all three "
                "(or none, for auto-detection)"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"{process_id=} must be in [0, {num_processes=})")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
        )
        return _info("explicit")
    cluster = cluster_environment() if auto else None
    if cluster is None:
        return _info(None)
    jax.distributed.initialize(
        local_device_ids=local_device_ids, initialization_timeout=initialization_timeout
    )
    return _info(cluster)


def is_primary() -> bool:
    """Whether this is process 0, the one that writes files and logs."""
    return jax.process_index() == 0


def on_primary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates ``fn`` to run on process 0 only (returning ``None`` elsewhere).

    Only for side effects (writing files, printing): never wrap collective computations,
    which every process must enter.

    Example:
      >>> @on_primary
      ... def save_table(rows): ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_primary() else None

    return wrapper


def primary_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on process 0 only."""
    if is_primary():
        print(*args, **kwargs)


class _PrimaryFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_primary()


def setup_logging(level: int = logging.INFO, logger: logging.Logger | None = None) -> None:
    """Lets log records through on process 0 only (on ``logger``'s handlers, default root).

    Adds a filter to the logger and each of its handlers, so records from any module are
    dropped on the other processes. Idempotent.
    """
    logger = logging.getLogger() if logger is None else logger
    if not logger.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(level)
    for target in (logger, *logger.handlers):
        if not any(isinstance(f, _PrimaryFilter) for f in target.filters):
            target.addFilter(_PrimaryFilter())
