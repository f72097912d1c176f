"""Multi-host initialisation, and files and logs from process 0 only.

:func:`initialize_distributed` joins a multi-process JAX runtime once per process (explicit
coordinator arguments, or JAX's auto-detection on TPU pod slices, SLURM and Open MPI) and
stays a single process elsewhere, so one command runs on a laptop, a Colab TPU and a pod.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax


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
