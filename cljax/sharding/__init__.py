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
    init = lambda key: TrainState.create(model.init(key, x0), optax.adam(1e-3), key)
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

The package holds four modules behind this one namespace: meshes, partition rules and
batch placement (``_mesh``); sharded states and steps and data-parallel gradients
(``_step``); the HLO analysis of collectives (``_hlo``); and multi-host initialisation with
primary-only output (``_distributed``).

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", SC 2020 (the FSDP sharding of params, gradients and optimizer states).
  Xu et al., "GSPMD: General and Scalable Parallelization for ML Computation Graphs", 2021.
"""

from cljax.sharding._distributed import (
    DistributedInfo,
    cluster_environment,
    initialize_distributed,
    is_primary,
    on_primary,
    primary_print,
    setup_logging,
)
from cljax.sharding._distributed import _PrimaryFilter as _PrimaryFilter
from cljax.sharding._hlo import Collective, collective_bytes, hlo_collectives
from cljax.sharding._mesh import (
    FSDP,
    REPLICATED,
    PartitionRules,
    batch_sharding,
    check_batch,
    describe_shardings,
    fsdp_spec,
    make_mesh,
    named_shardings,
    partition_specs,
    replicated,
    shard_batch,
    stacked_shardings,
)
from cljax.sharding._step import (
    abstract_with_shardings,
    create_sharded_state,
    data_parallel_value_and_grad,
    sharded_step,
)

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
