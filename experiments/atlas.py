"""aTLAS on the embedded merging benchmark: addition, negation, few-shot, test-time adaptation.

Command::

    python -m experiments.atlas                  # the embedded preset, 3 seeds, a process per core
    python -m experiments.atlas --workers 1      # the same in this process alone
    python -m experiments.atlas --preset tiny    # smoke test (seconds once the pool is cached)

Reuses the fine-tuned pool of ``experiments/merging.py`` (``build_pool`` and its checkpoint
cache under the merging run's folder) and learns aTLAS coefficients (one per task vector and
parameter block, :mod:`cljax.merging.atlas`) for five settings:

1. task addition: Σ_t CE_t on the validation splits, each sub-batch through its own frozen
   head, best epoch by mean normalised validation accuracy; against task arithmetic with λ
   tuned on the same validation data (grid 0..1 by 0.05). Absolute and normalised test
   accuracy.
2. task negation: per target task, −CE(target) + CE(control), keeping the lowest target
   validation accuracy with control ≥ 95 % of the pretrained model's; against task
   arithmetic negation θ0 − λτ with λ chosen by the same rule.
3. few-shot: for each held-out task, k ∈ {1, 2, 4, 8, 16} labelled examples per class, the
   other tasks' vectors, the task's frozen head, 30 steps of 16 images; against a linear
   probe on the pretrained features and against task arithmetic with λ tuned on the k-shot
   set (grid 0..1 by 0.1).
4. test-time adaptation: unlabelled test inputs of each held-out task, entropy minimisation
   and the FixMatch-style pseudo-label objective (weak view: the image; strong view: shift,
   noise and contrast jitter), the other tasks' vectors; one epoch, the last step kept.
5. aTLAS×K: task addition with each block split into K random groups.

Every learned setting runs over several seeds (batch order, k-shot draw); tables give
mean ± std. Writes ``results.json``, ``atlas.png`` and the markdown tables under ``--out``
(default ``runs/atlas``); completed (part, seed) units are cached in ``units.json`` and
skipped on a re-run (a damaged ``units.json`` is moved aside and its units run again).
The units run in ``--workers`` processes (default one per core; spawned, each loads the pool
and runs XLA on one thread), the costliest first. Each parameter set is evaluated once on every split it
is scored on (all tasks' images in one encoding pass, heads applied to the features), θ0's
features are kept, and a λ of few-shot task arithmetic is scored on every k at once, so
the evaluation passes cost what the scored images cost. Expected result (the paper's
claims): aTLAS above tuned task arithmetic in task addition, stronger forgetting at equal
control accuracy in negation, gains over the pretrained model from a few shots and from
unlabelled test images; the runtime, the numbers and which claims hold at this scale are
on ``docs/results/atlas.md``.

This module holds the configuration and the run; the pool is built in ``_atlas_pool``, the
parts run in ``_atlas_stages`` and the tables and figure are written by ``_atlas_report``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from cljax.checkpoint import load_json, save_json
from experiments._atlas_pool import DOMAINS, Pool, load_pool, standin_pool
from experiments._atlas_pool import _as_pool as _as_pool  # the tests adapt a pool by hand
from experiments._atlas_report import write_report
from experiments._atlas_stages import (
    _Accuracy,
    run_addition,
    run_few_shot,
    run_negation,
    run_task_arithmetic,
    run_tta,
)
from experiments._common import (
    add_config_flags,
    config_from_flags,
    progress,
    use_compilation_cache,
)

__all__ = [
    "DOMAINS",
    "PRESETS",
    "Config",
    "Pool",
    "load_pool",
    "main",
    "run",
    "run_addition",
    "run_few_shot",
    "run_negation",
    "run_task_arithmetic",
    "run_tta",
    "standin_pool",
    "write_report",
]


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    out: str = "runs/atlas"
    seeds: tuple[int, ...] = (0, 1, 2)
    parts: tuple[str, ...] = ("addition", "few_shot", "negation", "tta", "partitions")
    # task addition (reference: AdamW 1e-3, wd 0.1, clip 1, no schedule, best epoch on val)
    addition_epochs: int = 10
    addition_batch: int = 16  # per task, as the reference's 128 split over 8 tasks
    addition_lr: float = 5e-3  # reference 1e-3 over ~5x more steps: same reach (lr x steps)
    # task negation
    negation_epochs: int = 5
    negation_batch: int = 32
    negation_lr: float = 1e-2  # reference 1e-3 x a per-dataset multiplier of 2..10
    control_threshold: float = 0.95
    # few-shot (reference: lr 0.1, cosine, no warm-up)
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    few_shot_steps: int = 30
    # 16 images a step: k = 1 is 8-26 images, a batch of 32 would repeat most of them
    few_shot_batch: int = 16
    few_shot_lr: float = 0.1
    # points of task arithmetic's λ grid on [0, 1] tuned on the k shots (0: lambda_grid);
    # 11 (steps of 0.1): the shots, 8-416 images, cannot tell λ apart more finely
    few_shot_lambda_grid: int = 11
    probe_steps: int = 100
    probe_lr: float = 1e-2
    # test-time adaptation
    tta_epochs: int = 1  # the last epoch is kept: no labels to choose one by
    tta_batch: int = 64
    tta_lr: float = 1e-2
    tta_threshold: float = 0.9
    # aTLAS×K
    partitions: tuple[int, ...] = (2, 4)
    eval_batch: int = 1000
    pool_dir: str = ""  # default: the merging preset's output folder (its checkpoint cache)
    max_steps_per_epoch: int = 0  # 0: no cap (the tiny preset caps every loop)
    lambda_grid: int = 21  # points of the λ grid on [0, 1] for task arithmetic
    # processes that run the (part, seed) units: 0 one per core, 1 all in this process. Each
    # worker loads the pool with load_pool and runs XLA on one thread.
    workers: int = 0


# Every loop cut to a step or two: a smoke test of each part (on either pool).
_TINY: dict[str, Any] = {
    "seeds": (0,),
    "addition_epochs": 1,
    "negation_epochs": 1,
    "shots": (1, 4),
    "few_shot_steps": 3,
    "probe_steps": 5,
    "tta_epochs": 1,
    "partitions": (2,),
    "max_steps_per_epoch": 2,
    "lambda_grid": 3,
    "few_shot_lambda_grid": 3,
    "workers": 1,
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": _TINY,
    # the budgets its published figures were measured with
    "digits": {"few_shot_batch": 32, "few_shot_lambda_grid": 21, "tta_epochs": 2},
    "digits-tiny": _TINY,
}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    preset = args.preset or Config.preset
    base = dataclasses.replace(Config(), preset=preset, **PRESETS[preset])
    cfg = config_from_flags(base, args)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # The workers and the seeds compile the same programs: each is compiled once and read
    # back from a persistent cache under --out.
    use_compilation_cache(out / "jax_cache", _CACHE_MIN_COMPILE_S)
    t0 = time.time()
    pool = load_pool(cfg, out)
    print(f"pool ready in {time.time() - t0:.0f} s: {[t.name for t in pool.tasks]}")
    return run(cfg, pool, out)


def run(cfg: Config, pool: Pool, out: Path) -> dict:
    """Runs the parts of ``cfg`` on ``pool``; completed (part, seed) units are cached.

    With ``cfg.workers`` > 1 the units not yet cached run in that many processes, each of
    which loads its own pool with :func:`load_pool` (so ``pool`` must be the one
    ``load_pool(cfg, out)`` gives); each unit's record is saved here as it arrives.
    """
    t_start, cpu_start = time.time(), _cpu_s()
    units_path = out / "units.json"
    units = load_json(units_path)  # None if missing; a damaged file is moved aside
    if not isinstance(units, dict) or units.get("_config") != _config_key(cfg):
        units = {"_config": _config_key(cfg)}
    accuracy = _Accuracy(pool, cfg.eval_batch)
    tasks = pool.tasks

    def unit(name: str, fn: Callable[[], Any]):
        if name not in units:
            t0, c0 = time.time(), time.process_time()
            units[name] = fn()
            units[name + "/time_s"] = time.time() - t0
            units[name + "/cpu_s"] = time.process_time() - c0
            save_json(units_path, units)
        return units[name]

    def finetuned_acc():
        acc = {"val": [], "test": [], "pretrained_test": []}
        for i, task in enumerate(tasks):
            theta = jax.tree.map(lambda p, v, i=i: p + v[i], pool.pretrained, pool.task_vectors)
            val, test = accuracy.many(
                theta, [(pool.heads[i], task, "val"), (pool.heads[i], task, "test")]
            )
            acc["val"].append(val)
            acc["test"].append(test)
            acc["pretrained_test"].append(accuracy(pool.pretrained, pool.heads[i], task, "test"))
        return acc

    names = _unit_names(cfg)
    todo = [n for n in names if n not in units]
    with contextlib.ExitStack() as stack:
        workers = None
        if _num_workers(cfg) > 1 and len(todo) > 1:
            # Started first: the workers load their pools while this process scores the
            # fine-tuned models.
            workers = stack.enter_context(_start_workers(cfg, out, len(todo)))
        ft_acc = unit("finetuned", finetuned_acc)
        if workers is not None:
            _run_workers(workers, cfg, todo, ft_acc, units, units_path)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "tasks": [t.name for t in tasks]}
    results["finetuned"] = ft_acc
    for name in progress(names, desc="atlas", total=None):
        unit(name, lambda name=name: _run_unit(name, pool, cfg, accuracy, ft_acc))
    # This run's own cost (cached units cost nothing): wall, and the CPU time of this
    # process and of its workers.
    results["timing_s"] = {"run/wall_s": time.time() - t_start, "run/cpu_s": _cpu_s() - cpu_start}
    write_report(cfg, units, results, out)
    return results


def _unit_names(cfg: Config) -> list[str]:
    """The (part, seed) units of ``cfg``, in the order of its parts and seeds."""
    for part in cfg.parts:
        if part not in Config.parts:
            raise ValueError(f"unknown part {part!r}; the parts: {Config.parts}")
    names = []
    for part in cfg.parts:
        for seed in cfg.seeds:
            if part == "partitions":
                names += [f"partitions/{k}/{seed}" for k in cfg.partitions]
            else:
                names.append(f"{part}/{seed}")
    if "addition" in cfg.parts or "partitions" in cfg.parts:
        names.append("task_arithmetic")
    return names


def _run_unit(name: str, pool: Pool, cfg: Config, accuracy, ft_acc) -> Any:
    """One unit: ``part/seed``, ``partitions/K/seed`` or ``task_arithmetic``."""
    part, *rest = name.split("/")
    if part == "task_arithmetic":
        return run_task_arithmetic(pool, cfg, accuracy, ft_acc)
    seed = int(rest[-1])
    if part == "addition":
        return run_addition(pool, cfg, seed, accuracy, ft_acc)
    if part == "partitions":
        return run_addition(pool, cfg, seed, accuracy, ft_acc, partitions=int(rest[0]))
    if part == "negation":
        return run_negation(pool, cfg, seed, accuracy)
    if part == "few_shot":
        return run_few_shot(pool, cfg, seed, accuracy)
    if part == "tta":
        return run_tta(pool, cfg, seed, accuracy)
    raise ValueError(f"unknown unit {name!r}")


# The CPU time of a unit of each part relative to task addition's (one seed of the default
# preset), to start the costliest units first so the workers finish together.
_PART_COST = {
    "few_shot": 2.7,
    "negation": 1.4,
    "partitions": 1.0,
    "addition": 1.0,
    "tta": 0.6,
    "task_arithmetic": 0.4,
}


def _cpu_s() -> float:
    """User + system CPU time of this process and of its finished child processes."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# ------------------------------------------------------------- --workers: units in processes
# (experiments.zscl has its own --workers, one command per group of methods; the two should
# share one helper.)

_WORKER: dict[str, Any] = {}


def _num_workers(cfg: Config) -> int:
    """``cfg.workers``, or for 0 the cores this process may run on."""
    if cfg.workers < 0:
        raise ValueError(f"workers={cfg.workers} must be >= 0 (0: one per core)")
    if cfg.workers:
        return cfg.workers
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return len(cores) if cores else os.cpu_count() or 1


# Programs faster to compile than this are not worth a cache file.
_CACHE_MIN_COMPILE_S = 0.5


def _worker_init(cfg: Config, out: str, cache: str | None) -> None:
    os.environ["CLJAX_NO_PROGRESS"] = "1"
    if cache:  # the parent's persistent compilation cache, shared by the workers
        use_compilation_cache(cache, _CACHE_MIN_COMPILE_S)
    pool = load_pool(cfg, Path(out), draw_workers=1)  # a pool's worker may not spawn its own
    _WORKER.update(pool=pool, cfg=cfg, accuracy=_Accuracy(pool, cfg.eval_batch))


def _worker_unit(job: tuple[str, dict]) -> tuple[str, Any, float, float]:
    name, ft_acc = job
    w = _WORKER
    t0, c0 = time.time(), time.process_time()
    result = _run_unit(name, w["pool"], w["cfg"], w["accuracy"], ft_acc)
    return name, result, time.time() - t0, time.process_time() - c0


@contextlib.contextmanager
def _start_workers(cfg: Config, out: Path, units: int):
    """``min(workers, units)`` spawned processes, each with its own pool (:func:`load_pool`)
    and XLA on one thread: the workers share the cores instead of competing for them."""
    import multiprocessing

    n = min(_num_workers(cfg), units)
    saved = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{saved or ''} --xla_cpu_multi_thread_eigen=false".strip()
    try:
        ctx = multiprocessing.get_context("spawn")
        cache = jax.config.jax_compilation_cache_dir
        with ctx.Pool(n, _worker_init, (cfg, str(out), cache)) as workers:
            yield workers
    finally:
        if saved is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = saved


def _run_workers(workers, cfg: Config, todo: list[str], ft_acc, units: dict, path: Path):
    """Runs the units ``todo`` on ``workers``, seed by seed and the costliest first within a
    seed (a run cut short has whole seeds); each record is saved to ``path`` as it arrives,
    so a killed run resumes."""
    seeds = list(cfg.seeds)

    def rank(name: str) -> tuple[int, float]:
        part, *rest = name.split("/")
        return (seeds.index(int(rest[-1])) if rest else 0), -_PART_COST[part]

    jobs = [(name, ft_acc) for name in sorted(todo, key=rank)]
    bar = progress(workers.imap_unordered(_worker_unit, jobs), "atlas units", len(jobs))
    for name, result, wall, cpu in bar:
        units[name] = result
        units[name + "/time_s"] = wall
        units[name + "/cpu_s"] = cpu
        save_json(path, units)


def _config_key(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("out")
    d.pop("parts")
    d.pop("seeds")
    d.pop("workers")
    return json.loads(json.dumps(d))


if __name__ == "__main__":
    main()
