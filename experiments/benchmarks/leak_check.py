"""Memory over a long continual run: RSS after each of 20 tasks (no leaks across tasks).

Runs a 20-task Permuted MNIST sequence through :func:`cljax.continual.run_sequence` (the GPM
paper's MLP, Adam, checkpoints at every task boundary, GPM by default so the projection
memory, its hooks and the checkpoints are all exercised) and records the process RSS after
every task. Target: RSS after task 20 at most 10 % above RSS after task 2 (task 1 pays for
compilation and the first data). The table lists RSS per task.

Command::

    python -m experiments.benchmarks.leak_check --tasks 20 --method gpm

Runtime: about 2-4 minutes on a free 2-core CPU.
"""

from __future__ import annotations

import argparse
import gc
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cljax import continual as cl
from cljax import data
from experiments._common import format_table


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(100, use_bias=False)(x))
        x = nn.relu(nn.Dense(100, use_bias=False)(x))
        return nn.Dense(10, use_bias=False)(x)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--method", default="gpm", choices=["naive", "gpm"])
    args = p.parse_args(argv)

    tasks = data.permuted_mnist(args.tasks, seed=0)
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))["params"]
    methods = []
    if args.method == "gpm":
        from cljax import projection as pj

        record = jax.jit(lambda p, x: pj.record_layer_inputs(model, {"params": p}, x))
        methods = [cl.gpm([(r"Dense_[0-2]/kernel", True)], record, threshold=0.97, num_samples=300)]
    samples = []

    def progress(iterable, desc, total=None):
        gc.collect()
        samples.append(rss_mb())  # before each task's training: after the previous task
        return iterable

    with tempfile.TemporaryDirectory() as ckpt:
        result = cl.run_sequence(
            tasks,
            apply_fn=lambda p, x: model.apply({"params": p}, x),
            params=params,
            optimizer=optax.adam(1e-3),
            steps_per_task=args.steps,
            batch_size=32,
            methods=methods,
            scenario="domain",
            checkpoint_dir=ckpt,
            progress=progress,
            eval_batch_size=500,
        )
        gc.collect()
        samples.append(rss_mb())
    after = samples[1:]  # after[j] = RSS after task j+1
    rows = [
        {"after task": j + 1, "RSS MB": r, "vs after task 2 (%)": 100 * (r / after[1] - 1)}
        for j, r in enumerate(after)
    ]
    print(format_table(rows, floatfmt=".1f"))
    growth = 100 * (after[-1] / after[1] - 1)
    print(
        f"\nRSS after task {len(after)}: {after[-1]:.1f} MB, after task 2: {after[1]:.1f} MB "
        f"({growth:+.1f} %; target <= +10 %); final ACC {100 * result.metrics['acc']:.1f}"
    )
    return rows


if __name__ == "__main__":
    main()
