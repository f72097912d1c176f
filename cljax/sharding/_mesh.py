"""Meshes, partition rules and batch placement.

A mesh is built from a ``{name: size}`` spec; the shardings of a tree from ordered
``(regex, PartitionSpec)`` rules on its ``/``-joined leaf paths (first match wins), with
the FSDP rule of ZeRO (Rajbhandari et al., SC 2020) as a default; a batch is split over a
mesh axis along its leading dimension, in one process or as each process's slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax import tree as ct

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
