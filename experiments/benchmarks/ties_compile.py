"""First call (compile + run) of the merges on the ViT-B/32 tree, eager and under ``jax.jit``.

A user merging once pays the first call: compilation plus one run. Called eagerly, TIES
reads the leaves through small programs compiled once per leaf shape (the threshold search,
the XLA implementation of :func:`cljax.kernels.ties_threshold`, runs from Python; the merge
is one program per leaf shape); under ``jax.jit`` the whole merge is one computation with code for
every leaf. For each merge the table gives the first eager call (wall clock and the
process's CPU time, user + system, which a busy machine inflates less), the median of
later eager calls (and their CPU time over task arithmetic's, when it is among the merges),
and ``jax.jit(...).lower(...).compile()`` of the same merge; the load average is printed with
the table. Each merge runs on a fresh tree (new shapes: nothing is
compiled before its first call), in the order given.

Command:
  python -m experiments.benchmarks.ties_compile               # full size, ~4 GB of RAM
  python -m experiments.benchmarks.ties_compile --scale 0.1   # widths x sqrt(0.1)
  python -m experiments.benchmarks.ties_compile --preset tiny  # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time

import jax

from cljax import merging
from experiments import _common
from experiments.benchmarks.merge_bench import _is_shape, random_trees, vit_b32_shapes


@dataclasses.dataclass(frozen=True)
class Config:
    scale: float = 1.0  # parameter count relative to ViT-B/32 (widths scale by sqrt)
    tasks: int = 8
    density: float = 0.2
    drop_rate: float = 0.9
    merges: str = "ties_global,ties_leaf,dare,task_arithmetic"
    repeats: int = 3  # eager calls after the first
    jit: bool = True  # also time jax.jit(...).lower(...).compile()
    out: str = "runs/ties_compile"
    preset: str = "default"


PRESETS = {"default": Config(), "tiny": Config(scale=0.002, tasks=2, repeats=1)}


def _merges(cfg: Config) -> dict:
    key = jax.random.key(1)
    return {
        "ties_global": lambda p, t: merging.ties(p, t, density=cfg.density),
        "ties_leaf": lambda p, t: merging.ties(p, t, density=cfg.density, scope="leaf"),
        "dare": lambda p, t: merging.dare(t, drop_rate=cfg.drop_rate, key=key),
        "task_arithmetic": lambda p, t: merging.task_arithmetic(p, t, 0.3),
    }


def run(cfg: Config) -> dict:
    rows = []
    merges = _merges(cfg)
    for i, name in enumerate(cfg.merges.split(",")):
        call = merges[name]
        # A tree of its own (one row more of the positional embedding each): no program
        # that an earlier merge compiled serves this one.
        shapes = vit_b32_shapes(cfg.scale)
        w = shapes["positional_embedding"][1]
        shapes["positional_embedding"] = (50 + i, w)
        pre, tvs = random_trees(shapes, cfg.tasks)
        jax.block_until_ready(tvs)
        timings = []
        load = os.getloadavg()[0]
        for _ in range(1 + cfg.repeats):
            cpu = time.process_time()
            start = time.perf_counter()
            jax.block_until_ready(call(pre, tvs))
            timings.append((time.perf_counter() - start, time.process_time() - cpu))
        row = {
            "merge": name,
            "first call (s)": timings[0][0],
            "first call CPU (s)": timings[0][1],
            "later calls, median (s)": statistics.median(t for t, _ in timings[1:]),
            "later calls CPU, median (s)": statistics.median(c for _, c in timings[1:]),
            "load (1 min)": load,
        }
        if cfg.jit:
            cpu = time.process_time()
            start = time.perf_counter()
            jax.jit(call).lower(pre, tvs).compile()
            row["jit lower + compile (s)"] = time.perf_counter() - start
            row["jit compile CPU (s)"] = time.process_time() - cpu
        rows.append(row)
        if _common.is_primary():
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        del pre, tvs
    # Steady eager cost against task arithmetic's, in process CPU time (a shared machine
    # inflates the wall clock of calls that synchronise with the host far more).
    ta = [r["later calls CPU, median (s)"] for r in rows if r["merge"] == "task_arithmetic"]
    for r in rows:
        r["later calls CPU / task arithmetic"] = (
            r["later calls CPU, median (s)"] / ta[0] if ta and ta[0] > 0 else float("nan")
        )
    spec = vit_b32_shapes(cfg.scale)
    return {
        "config": dataclasses.asdict(cfg),
        "num_leaves": len(jax.tree.leaves(spec, is_leaf=_is_shape)),
        "num_params": sum(math.prod(s) for s in jax.tree.leaves(spec, is_leaf=_is_shape)),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        # A persistent compilation cache would hide the compile time the first call pays.
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "rows": rows,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    cfg = _common.config_from_flags(PRESETS[args.preset or "default"], args)
    res = run(cfg)
    if _common.is_primary():
        print(
            f"\nFirst calls, {res['num_params'] / 1e6:.1f}M parameters in {res['num_leaves']} "
            f"leaves x {cfg.tasks} task vectors, jax {res['jax']}, {res['cpu_count']} CPU "
            f"cores, load average {os.getloadavg()[0]:.1f} at the end, persistent compilation "
            f"cache: {res['compilation_cache_dir'] or 'off'}\n"
        )
        cols = list(res["rows"][0])
        print(_common.format_table(res["rows"], cols, floatfmt=".2f"))
        _common.write_json(os.path.join(cfg.out, "results.json"), res)
    return res


if __name__ == "__main__":
    main()
