"""Step time of multi-task aggregators and their F-MTL variants (T = 2 and 8 tasks).

Times one jitted, donated train step (gradients, aggregation, Adam update) for EW
(one backward pass of the mean loss), PCGrad, MGDA, CAGrad (one forward, T vectorised
backward passes, one Gram matrix) and their F-MTL variants (T+1 forward and 2T backward
passes, two aggregations), on two models with T linear heads:

* ``lenet``: the Multi-MNIST trunk of ``experiments/mtl.py`` (36×36 inputs, batch 64);
* ``resnet18``: ResNet-18 at full width (11.2M trunk parameters, BatchNorm), 16×16 inputs,
  batch 4, small enough for a CPU.

The unavoidable compute of an F-MTL step is T+1 forward and 2T backward passes against 1
and 1 for EW; with a backward pass costing about two forward passes that is a ratio of
``(T + 1 + 4T) / 3`` (3.67 for T=2, 13.67 for T=8). The table reports the measured ratio to
EW and its fraction of that bound ("× bound"; the target is at most 1.15).

Command::

    python -m experiments.benchmarks.mtl_bench            # both models, T = 2 and 8
    python -m experiments.benchmarks.mtl_bench --models lenet --repeats 3
    # per-task passes one task at a time, unrolled (faster for LeNet on XLA:CPU)
    python -m experiments.benchmarks.mtl_bench --models lenet --task_batch_size 1 --unroll

Expected runtime: a few minutes on a 2-core CPU (ResNet-18 compile time dominates).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import mtl
from cljax.models import ResNet18
from cljax.train import TrainState
from experiments import _common as C
from experiments.mtl import Trunk

METHODS = {
    "EW": None,
    "PCGrad": mtl.pcgrad,
    "MGDA": mtl.mgda,
    "CAGrad": functools.partial(mtl.cagrad, c=0.4),
}


def build(model_name: str, t: int):
    if model_name == "lenet":
        trunk, shape, bs = Trunk(16), (36, 36, 1), 64
    else:
        trunk, shape, bs = ResNet18(None, small_input=True), (16, 16, 3), 4
    model = mtl.MultiHead(trunk, (10,) * t)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(bs, *shape)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 10, (bs, t)), jnp.int32)
    kwargs = {"train": True} if model_name == "resnet18" else {}
    variables = model.init(jax.random.key(0), x, **kwargs)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p, batch, ms):
        if ms:
            logits, new = model.apply({"params": p, **ms}, batch["x"], mutable=list(ms), **kwargs)
        else:
            logits, new = model.apply({"params": p}, batch["x"]), ms
        return mtl.classification_losses(logits, batch["y"]), new

    return params, model_state, loss_fn, {"x": x, "y": y}


def time_step(grad_fn, params, model_state, batch, repeats: int) -> float:
    step = mtl.make_mtl_step(grad_fn)
    box = [TrainState.create(params, optax.adam(1e-3), key=0, methods={"model_state": model_state})]

    def run():
        box[0], m = step(box[0], batch)
        jax.block_until_ready(m["loss"])

    return C.median_time(run, warmup=2, repeats=repeats)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet18"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument(
        "--task_batch_size",
        type=int,
        default=None,
        help="tasks per chunk of the per-task passes (default: all at once, vmap)",
    )
    parser.add_argument(
        "--unroll", action="store_true", help="chunks as a Python loop, not lax.map"
    )
    args = parser.parse_args(argv)
    rows = []
    for model_name in args.models:
        for t in args.tasks:
            # Copies: the step donates its state, and params are reused across methods.
            params, ms, loss_fn, batch = build(model_name, t)
            copy = lambda tree: jax.tree.map(jnp.array, tree)
            common = dict(
                head_rules=mtl.HEAD_RULES,
                has_aux=True,
                task_batch_size=args.task_batch_size,
                unroll=args.unroll,
            )
            base = None
            bound = (t + 1 + 4 * t) / 3
            for name, agg in METHODS.items():
                for f in (False, True):
                    if f:
                        grad_fn = mtl.fmtl(loss_fn, agg or mtl.linear, rho=args.rho, **common)
                    else:
                        grad_fn = mtl.mtl_grad_fn(loss_fn, agg, **common)
                    t0 = time.perf_counter()
                    sec = time_step(grad_fn, copy(params), copy(ms), batch, args.repeats)
                    if base is None:
                        base = sec
                    ratio = sec / base
                    rows.append(
                        {
                            "model": model_name,
                            "T": t,
                            "method": ("F-" if f else "") + name,
                            "step ms": 1e3 * sec,
                            "× EW": ratio,
                            "× bound": ratio / bound if f else float("nan"),
                            "_wall": time.perf_counter() - t0,
                        }
                    )
                    print(rows[-1], flush=True)
    print()
    print(
        C.format_table(rows, ["model", "T", "method", "step ms", "× EW", "× bound"], floatfmt=".2f")
    )
    print("\nbound = (T+1 forward + 2T backward) / (1 forward + 1 backward), backward = 2 forward")
    return rows


if __name__ == "__main__":
    main()
