"""Compile time of TIES on the ViT-B/32 tree: an eager first call against a jitted one.

Called eagerly, ``ties`` compiles the threshold search and the marked merge; its rare second
round (a tie or a NaN in the output: the majority sign and an unmarked merge) is compiled
only when a call needs it; per leaf, it compiles one threshold search a leaf shape (called
leaf by leaf). Inside ``jax.jit`` everything is one computation, with a search a leaf. For
each scope the table gives the first eager call (compile included), the median of later
ones, and ``jax.jit(...).lower(...).compile()`` of the same merge.

Command:
  python -m experiments.benchmarks.ties_compile --scale 0.1   # ~4 min on 2 cores
  python -m experiments.benchmarks.ties_compile --preset tiny  # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax

from cljax import merging
from experiments import _common
from experiments.benchmarks.merge_bench import random_trees, vit_b32_shapes


@dataclasses.dataclass(frozen=True)
class Config:
    scale: float = 0.1  # parameter count relative to ViT-B/32 (widths scale by sqrt)
    tasks: int = 8
    density: float = 0.2
    scopes: str = "global,leaf"
    repeats: int = 5  # eager calls after the first
    out: str = "runs/ties_compile"
    preset: str = "default"


PRESETS = {"default": Config(), "tiny": Config(scale=0.002, tasks=2, repeats=1)}


def run(cfg: Config) -> dict:
    pre, tvs = random_trees(vit_b32_shapes(cfg.scale), cfg.tasks)
    jax.block_until_ready(tvs)
    rows = []
    for scope in cfg.scopes.split(","):
        call = lambda p, t, scope=scope: merging.ties(p, t, density=cfg.density, scope=scope)
        timings = []
        for _ in range(1 + cfg.repeats):  # eager: the first call compiles
            start = time.perf_counter()
            jax.block_until_ready(call(pre, tvs))
            timings.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.jit(call).lower(pre, tvs).compile()
        jitted = time.perf_counter() - start
        rows.append(
            {
                "scope": scope,
                "eager first call (s)": timings[0],
                "eager later calls, median (s)": statistics.median(timings[1:]),
                "jit lower + compile (s)": jitted,
            }
        )
        if _common.is_primary():
            print(rows[-1])
    return {
        "config": dataclasses.asdict(cfg),
        "num_leaves": len(jax.tree.leaves(pre)),
        "num_params": sum(x.size for x in jax.tree.leaves(pre)),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
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
            f"\nTIES compile, {res['num_params'] / 1e6:.1f}M parameters in {res['num_leaves']} "
            f"leaves x {cfg.tasks} task vectors, jax {res['jax']}, {res['cpu_count']} CPU cores\n"
        )
        cols = list(res["rows"][0])
        print(_common.format_table(res["rows"], cols, floatfmt=".2f"))
        _common.write_json(os.path.join(cfg.out, "results.json"), res)
    return res


if __name__ == "__main__":
    main()
