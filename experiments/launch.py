"""Runs an experiment on one process or many: the same command on every host.

Usage::

    # one process (a laptop, a Colab TPU, one GPU machine): no flags needed
    python -m experiments.launch merging --preset tiny

    # a TPU pod slice or a SLURM job: JAX auto-detects the cluster, every host runs this
    python -m experiments.launch merging

    # anything else: name the coordinator (process 0's host), the count and this process
    python -m experiments.launch --coordinator 10.0.0.1:1234 --num_processes 4 \\
        --process_id $RANK merging

    # two local processes of 4 simulated CPU devices each (what the tests do)
    python -m experiments.launch --coordinator 127.0.0.1:5123 --num_processes 2 \\
        --process_id 0 --cpu_devices 4 selftest --out /tmp/st &
    python -m experiments.launch --coordinator 127.0.0.1:5123 --num_processes 2 \\
        --process_id 1 --cpu_devices 4 selftest --out /tmp/st

The target is an experiment name (``merging`` runs ``experiments.merging``), a module
(``experiments.benchmarks.comm_bench``) or ``module:function``; what follows it is passed to
its ``main``. The launcher initialises JAX's multi-process runtime before the target imports
anything (:func:`cljax.sharding.initialize_distributed`) and lets only process 0 log.

The built-in target ``selftest`` checks a cluster in seconds: a short FSDP training of a
small MLP on a mesh over every device of every process, then a task-arithmetic merge of
stacked task vectors sharded on the task axis; it prints a fingerprint of the results, which
must be the same on every process and for any number of processes (up to float rounding of
the cross-device sums). Runtime: about 5 s on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_args", "run_target", "selftest"]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Splits the launcher's flags from the target and the target's own arguments."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description="Run an experiment on one or many processes (same command on every host).",
    )
    p.add_argument("--coordinator", default=None, help="host:port of process 0")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument(
        "--local_device_ids", default=None, help="comma-separated local devices of this process"
    )
    p.add_argument(
        "--no_auto", action="store_true", help="do not auto-detect TPU pods / SLURM / MPI"
    )
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=None,
        help="simulate this many CPU devices in this process (testing on one machine)",
    )
    p.add_argument("target", help="experiment name, module, module:function, or 'selftest'")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the target")
    ns = p.parse_args(argv)
    args = list(ns.args)
    if args[:1] == ["--"]:
        args = args[1:]
    return ns, args


def _resolve(target: str) -> Any:
    if target == "selftest":
        return selftest
    module, _, func = target.partition(":")
    if "." not in module:
        module = f"experiments.{module}"
    mod = importlib.import_module(module)
    fn = getattr(mod, func or "main", None)
    if fn is None:
        raise ValueError(f"{target=}: module {module} has no function {func or 'main'!r}")
    return fn


def run_target(target: str, args: Sequence[str]) -> Any:
    """Calls the target's function with ``args`` (as ``argv``, or through ``sys.argv``)."""
    fn = _resolve(target)
    params = inspect.signature(fn).parameters
    if params:
        return fn(list(args))
    saved = sys.argv
    sys.argv = [target, *args]
    try:
        return fn()
    finally:
        sys.argv = saved


def main(argv: Sequence[str] | None = None) -> Any:
    ns, args = parse_args(argv)
    import jax

    if ns.cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", ns.cpu_devices)
        if ns.num_processes and ns.num_processes > 1:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")

    from cljax import sharding as cs

    local_ids = [int(i) for i in ns.local_device_ids.split(",")] if ns.local_device_ids else None
    info = cs.initialize_distributed(
        ns.coordinator,
        ns.num_processes,
        ns.process_id,
        local_device_ids=local_ids,
        auto=not ns.no_auto,
    )
    cs.setup_logging(logging.WARNING)  # process 0 only; libraries' INFO chatter off
    logging.getLogger("cljax").setLevel(logging.INFO)
    logging.getLogger("cljax.launch").info(
        "process %d of %d, %d local / %d global devices (%s)",
        info.process_index,
        info.process_count,
        info.local_device_count,
        info.device_count,
        info.cluster or "single process",
    )
    return run_target(ns.target, args)


# ----------------------------------------------------------------------------- selftest


def selftest(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """A short sharded training and merge over all processes; returns host copies of both.

    Flags: ``--steps`` (3), ``--mode`` (``fsdp`` or ``dp``), ``--out`` (each process writes
    ``selftest_p<i>.npz`` there, so the processes can be compared), ``--ckpt`` (save the
    final train state there with :class:`cljax.checkpoint.CheckpointManager`).
    """
    p = argparse.ArgumentParser(prog="selftest")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mode", choices=("fsdp", "dp"), default="fsdp")
    p.add_argument("--out", default=None)
    p.add_argument("--ckpt", default=None)
    a = p.parse_args(list(argv or []))

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from cljax import sharding as cs

    mesh = cs.make_mesh({"data": -1})
    state, state_sh, step, tvs, tv_sh, merge = selftest_problem(mesh, a.mode)
    x, y = selftest_data()
    n = x.shape[0] // jax.process_count()
    lo = jax.process_index() * n
    losses = []
    for _ in range(a.steps):
        batch = cs.shard_batch({"x": x[lo : lo + n], "y": y[lo : lo + n]}, mesh)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    tvs = jax.device_put(tvs, tv_sh)
    merged = merge(state.params, tvs)
    if a.ckpt:
        from cljax.checkpoint import CheckpointManager

        CheckpointManager(a.ckpt).save(a.steps, state)
    host = multihost_utils.process_allgather({"params": state.params, "merged": merged}, tiled=True)
    flat = {
        f"{k}/{path}": np.asarray(v)
        for k in ("params", "merged")
        for path, v in _flat(host[k]).items()
    }
    flat["losses"] = np.asarray(losses)
    cs.primary_print(
        f"selftest: {jax.process_count()} process(es), mesh {dict(mesh.shape)}, "
        f"losses {np.round(losses, 5).tolist()}, merged sum {sum(float(v.sum()) for k, v in flat.items() if k.startswith('merged')):.6f}"
    )
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        np.savez(Path(a.out) / f"selftest_p{jax.process_index()}.npz", **flat)
    return flat


def _flat(tree: Any) -> dict[str, Any]:
    from cljax import tree as ct

    return dict(ct.leaves_with_paths(tree))


def selftest_data(n: int = 32, d: int = 16, k: int = 4) -> tuple[Any, Any]:
    """The global batch of the selftest (deterministic numpy)."""
    import numpy as np

    r = np.random.default_rng(0)
    x = r.normal(size=(n, d)).astype(np.float32)
    y = np.tanh(x @ r.normal(size=(d, k))).astype(np.float32)
    return x, y


def selftest_problem(mesh: Any, mode: str = "fsdp", num_tasks: int = 8) -> tuple[Any, ...]:
    """The selftest's sharded state, step, task vectors and merge on ``mesh``.

    Returns:
      ``(state, state_shardings, step, task_vectors, task_vector_shardings, merge)``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from cljax import sharding as cs
    from cljax import tree as ct
    from cljax.train import TrainState, make_step

    r = np.random.default_rng(1)
    shapes = {"hidden": {"kernel": (16, 32), "bias": (32,)}, "out": {"kernel": (32, 4)}}
    params0 = jax.tree.map(
        lambda s: (0.3 * r.normal(size=s)).astype(np.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )
    tvs = ct.stack(
        [jax.tree.map(lambda p: (0.01 * r.normal(size=p.shape)).astype(np.float32), params0)
         for _ in range(num_tasks)]
    )  # fmt: skip

    def init(params):
        return TrainState.create(params, optax.adam(1e-2), key=jax.random.key(0))

    def loss_fn(params, batch, rng):
        h = jnp.tanh(batch["x"] @ params["hidden"]["kernel"] + params["hidden"]["bias"])
        return jnp.mean((h @ params["out"]["kernel"] - batch["y"]) ** 2)

    default = cs.FSDP if mode == "fsdp" else cs.REPLICATED
    state, state_sh = cs.create_sharded_state(init, params0, mesh=mesh, default=default)
    step = cs.sharded_step(make_step(loss_fn, jit=False), state_sh, cs.batch_sharding(mesh))
    tv_sh = cs.stacked_shardings(tvs, mesh, task_axis="data")
    merge = jax.jit(
        _task_arithmetic,
        in_shardings=(state_sh.params, tv_sh),
        out_shardings=state_sh.params,
    )
    return state, state_sh, step, tvs, tv_sh, merge


def _task_arithmetic(params: Any, task_vectors: Any) -> Any:
    import jax

    return jax.tree.map(lambda p, t: p + 0.3 * t.sum(0), params, task_vectors)


if __name__ == "__main__":
    main()
