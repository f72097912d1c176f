"""ZSCL / MTIL on MiniCLIP: does distillation + weight ensembling keep the zero-shot transfer
of a CLIP while it learns a sequence of tasks?

Command::

    python -m experiments.zscl                        # MiniCLIP, embedded benchmark, 3 seeds
    python -m experiments.zscl --workers 1            # the same, in this process alone
    python -m experiments.zscl --preset tiny          # smoke run (3 tasks, 1 seed, toy sizes)
    python -m experiments.zscl --preset digits        # the MLP setting on digit domains
    python -m experiments.zscl --preset mtil --clip_path CLIP_DIR --data_dir TFDS_DIR
                                                      # CLIP on the 11 MTIL datasets: clip_zscl.py

Default setting, as the paper (Zheng et al., ICCV 2023; github.com/Thunderbeee/ZSCL,
``mtil/``) with the embedded foundation in the place of CLIP and its data:

* the model is MiniCLIP (``cljax.models.clip.load_pretrained()``); its image tower is
  fine-tuned, its text tower stays frozen;
* the sequence is six tasks of ``cljax.data.embedded_benchmark()`` in the benchmark's order
  (that of the names of the data sets they stand for, as MTIL order I is): textures, digits,
  signs, mnist, shapes, svhn; each task is classified by its zero-shot head (its class names
  in its prompt templates, through the text tower); after every task every task is
  evaluated, so ``A[j, i]`` also holds the zero-shot accuracy of the tasks not trained yet;
* ZSCL's reference set (ImageNet images, Conceptual Captions texts) is 1,000 image-caption
  pairs of the pretraining corpus (``cljax.data.corpus_batch``) from a seed MiniCLIP never
  saw; the captions are embedded once by the frozen text tower.

Methods (the reference's ``mtil/scripts``), all sharing :func:`experiments.clip_zscl.run_method`:

* ``finetune``: continual fine-tuning, cross-entropy with label smoothing 0.2;
* ``zscl``: distillation + weight ensemble + the summed L2 to the start-of-task weights
  (``ZSCL.sh``);
* ``lwf``: ``lwf.sh``: ZSCL's distillation with the start-of-task model as teacher, the
  current task's images and its class prompts, both terms, ``T^2``-scaled;
* ``wise_ft``: ``WiSE_finetune.sh``: after each task, ``interpolate(theta_start, theta_ft,
  0.8)``;
* ``we``: ``we.sh``-style weight ensemble alone (a snapshot every ``avg_freq`` iterations, the
  next task starts from the mean);
* ``distill``: ZSCL's distillation alone (teacher = the pretrained image tower).

Recipe: ZSCL's, scaled to MiniCLIP: ``steps_per_task + 1`` iterations a task (40 + 1; ZSCL
1,000 + 1), warm-up and ensemble period scaled alike (4; ZSCL 100) so the ensemble holds the
same 11 snapshots including the final weights, AdamW without weight decay and a fresh state
per task, the reference's cosine schedule, batches of 16 training and 16 reference images
(ZSCL 64 and 64), training images through ZSCL's training transform (a random resized crop
of 90-100 % of the area), the loader's shuffled epochs over the whole training split, L2
weight 1 and KD temperature 2 as ``ZSCL.sh``. The learning rate (3e-4) is MiniCLIP's, not
CLIP's 1e-5.

Metrics (ZSCL's, ``cljax.continual``): Transfer (mean over i >= 1 of the accuracy on task i
before it is trained), Avg (mean of the whole matrix), Last (mean of the last row).

Workers (``--workers N``, MiniCLIP presets): the methods are split over N processes of this
command, balanced by their cost, each one training whole methods (every seed) with
``--methods GROUP`` into the same ``--out``; this process then writes the tables. A method's
checkpoints live in its own folder (``<out>/ckpt/<method>``), so the workers never write the
same file, and a killed run resumes with the same command; the workers' logs and parts of
the results are in ``<out>/workers``. The default, 0, is one worker per core (at most one per
method): one process keeps about one core busy (its steps are small and Python drives them),
the results do not depend on the split, and the preset's time target holds only with the
cores in use. ``--workers 1`` keeps everything in this process (a debugger, a profile, a
shared machine); the tiny preset does so by default, its compiles outweighing the split.

Runtime and results: ``docs/results/zscl.md`` (the default preset is about 1,400 s of CPU time,
mostly on one core per process; ``--preset tiny`` in CPU seconds plus compiles).

The ``digits`` preset is the earlier setting: a small MLP encoder pretrained on upright
MNIST, frozen linear probes as "zero-shot" heads, five domain-shifted digit tasks
(``mtil_domain_tasks``), MNIST-1D strokes as the reference set; its settings are ``Config``
here, its code ``run`` in ``experiments/_zscl_digits.py``. The MiniCLIP setting's data and
heads are built in ``experiments/_zscl_embedded.py``, the tables and figures of both in
``experiments/_zscl_report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cljax import continual
from experiments import _common
from experiments._zscl_digits import (  # noqa: F401 (re-exported)
    ENCODER,
    METHODS,
    method_flags,
    run,
)
from experiments._zscl_embedded import (
    REFERENCE_SEED,
    _check_embedded,
    _draw_benchmark,
    _embedded_env,
)
from experiments._zscl_report import _plots, _targets, matrices, summarize


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters of the experiment (flags: ``--name value``)."""

    preset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] = ()  # training order; empty = the benchmark's order
    steps_per_task: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 15
    label_smoothing: float = 0.2
    # ZSCL
    avg_freq: int = 10
    temperature: float = 2.0
    logit_scale: float = 100.0
    num_reference: int = 1500
    num_anchors: int = 300
    ref_batch_size: int = 64
    distill_weight: float = 1.0
    l2_weight: float = 0.01
    # baselines
    lwf_weight: float = 1.0
    wise_alpha: float = 0.8
    # pretrained encoder and frozen heads
    pretrain_steps: int = 800
    probe_steps: int = 300
    out: str = "runs/zscl_digits"


DIGIT_PRESETS: dict[str, dict[str, Any]] = {
    "digits": {},
    "digits-tiny": {
        "seeds": (0,),
        "steps_per_task": 6,
        "batch_size": 16,
        "warmup": 2,
        "avg_freq": 2,
        "num_reference": 64,
        "num_anchors": 16,
        "ref_batch_size": 16,
        "pretrain_steps": 30,
        "probe_steps": 20,
        "tasks": ("rotated", "digits", "parity"),
    },
}


# ------------------------------------------------------------- MiniCLIP on the benchmark


@dataclasses.dataclass(frozen=True)
class EmbeddedConfig:
    """The default preset: ZSCL / MTIL with MiniCLIP on the embedded benchmark (flags:
    ``--name value``). The recipe is ZSCL's (``mtil/scripts/ZSCL.sh``) scaled to MiniCLIP:
    1,000 iterations become ``steps_per_task``, the warm-up (100) and the ensemble period
    (100) scale with them, so a task still ends with the ensemble of 11 snapshots."""

    preset: str = "default"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    # MTIL-style: the benchmark's tasks in its order (that of their stand-ins' names, as MTIL
    # order I), less greek and letters, which fine-tuning does not learn (docs/results/zscl.md)
    tasks: tuple[str, ...] = ("textures", "digits", "signs", "mnist", "shapes", "svhn")
    train_size: int = 1000
    test_size: int = 150
    steps_per_task: int = 40  # + 1, as the reference's range(iterations + 1)
    batch_size: int = 16
    lr: float = 3e-4
    fast_lr: float = 3e-4
    fast_lr_tasks: tuple[str, ...] = ()
    warmup: int = 4
    augment: bool = True  # ZSCL's training transform: RandomResizedCrop(scale=(0.9, 1.0))
    label_smoothing: float = 0.2
    avg_freq: int = 4
    temperature: float = 2.0
    distill_weight: float = 1.0
    l2_weight: float = 1.0
    wise_alpha: float = 0.8
    num_reference: int = 1000  # corpus image-caption pairs: reference images and texts
    ref_batch_size: int = 16
    eval_batch_size: int = 150
    # processes that share the methods, each one training whole methods (every seed); 0: one
    # per core, at most one per method; 1: this process alone. The results do not depend on it
    workers: int = 0
    out: str = "runs/zscl"


EMBEDDED_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "seeds": (0,),
        "tasks": ("textures", "digits", "signs"),
        "train_size": 32,
        "test_size": 16,
        "steps_per_task": 2,
        "batch_size": 8,
        "warmup": 1,
        "avg_freq": 1,
        "num_reference": 24,
        "ref_batch_size": 8,
        "eval_batch_size": 16,
        # compiles dominate a smoke run: a worker would add its start and its setup
        "workers": 1,
    },
}


def run_embedded(cfg: EmbeddedConfig) -> dict[str, Any]:
    """The default preset: every method, every seed; returns what ``results.json`` holds."""
    from experiments.clip_zscl import run_method

    _check_embedded(cfg)
    out = Path(cfg.out)
    t0, c0 = time.perf_counter(), time.process_time()
    env = _embedded_env(cfg)
    zero_shot = env["evaluate"](env["theta0"])
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "tasks": list(cfg.tasks),
        "reference": {"source": f"corpus_batch(seed={REFERENCE_SEED})", "pairs": cfg.num_reference},
        "zero_shot": zero_shot.tolist(),
        "setup_seconds": time.perf_counter() - t0,
        "setup_cpu_seconds": time.process_time() - c0,
        "runs": {},
    }
    fingerprint = json.loads(
        json.dumps(
            {
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k not in ("methods", "out", "seeds", "eval_batch_size", "workers")
            }
        )
    )
    for method in cfg.methods:
        t1, c1 = time.perf_counter(), time.process_time()
        per_seed = run_method(
            method, cfg, env, out / "ckpt" / method, fingerprint, seeds=tuple(cfg.seeds)
        )
        results["runs"][method] = [
            {
                "seed": seed,
                "accuracy": acc.tolist(),
                "transfer": continual.mtil_transfer(acc),
                "avg": continual.mtil_avg(acc),
                "last": continual.mtil_last(acc),
                "resumed_from": start,
            }
            for seed, (acc, start) in zip(cfg.seeds, per_seed, strict=True)
        ]
        results.setdefault("seconds_per_method", {})[method] = time.perf_counter() - t1
        results.setdefault("cpu_seconds_per_method", {})[method] = time.process_time() - c1
    return results


# ------------------------------------------------------------- --workers: methods in processes

#: A method's cost relative to continual fine-tuning, to balance the workers: the distilling
#: methods (zscl, distill, lwf) run the encoder on a second batch of images and the frozen
#: teacher on it, zscl adds the ensemble and the L2 term, lwf compiles its step once per class
#: count; the ratios are those of the CPU time of one seed of the default preset.
METHOD_COST = {"finetune": 1.0, "wise_ft": 0.9, "we": 1.1, "distill": 1.5, "zscl": 2.1, "lwf": 2.5}

#: The environment variable that makes ``main`` a worker of a ``--workers`` run: the path of
#: the JSON file where it writes its part of the results (it prints no table).
WORKER_RECORD = "CLJAX_ZSCL_WORKER_RECORD"


def num_workers(cfg: EmbeddedConfig) -> int:
    """The processes a run uses: ``cfg.workers``, or one per core (the cores this process may
    run on) for 0; at most one per method, since a worker trains whole methods."""
    n = cfg.workers
    if n == 0:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        n = len(cores) if cores else os.cpu_count() or 1
    return max(1, min(n, len(cfg.methods)))


def split_methods(methods: tuple[str, ...], n: int) -> list[tuple[str, ...]]:
    """``methods`` in ``n`` groups of nearly equal :data:`METHOD_COST`: the costliest method
    first, each to the group with the least cost so far (the longest-processing-time rule);
    each group keeps the order of ``methods``."""
    load = [0.0] * n
    groups: list[list[str]] = [[] for _ in range(n)]
    for m in sorted(methods, key=lambda m: -METHOD_COST.get(m, 1.0)):  # stable: ties in order
        k = load.index(min(load))
        groups[k].append(m)
        load[k] += METHOD_COST.get(m, 1.0)
    return [tuple(m for m in methods if m in g) for g in groups if g]


def _watch_parent() -> None:
    """A worker ends when its parent does, also when the parent is killed: its stdin is a pipe
    from the parent, which reads end-of-file once the parent is gone. What the worker has
    checkpointed stays; the same command resumes from it."""
    import threading

    def watch() -> None:
        # the file descriptor, not sys.stdin: a thread blocked in sys.stdin's reader holds its
        # lock, which the interpreter takes when it shuts down
        while os.read(0, 1 << 16):
            pass
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _tasks_done(out: Path, cfg: EmbeddedConfig) -> int:
    """Finished (method, seed, task) triples, from the checkpoints' step numbers."""
    done = 0
    for m in cfg.methods:
        for seed in cfg.seeds:
            steps = [
                int(p.name[5:])
                for p in (out / "ckpt" / m / f"seed{seed}").glob("step_*")
                if p.name[5:].isdigit()
            ]
            done += max(steps, default=0)
    return done


def run_workers(
    cfg: EmbeddedConfig,
    argv: list[str],
    groups: list[tuple[str, ...]],
    *,
    command: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Runs the command ``python -m experiments.zscl *argv`` (or ``command`` then ``argv``)
    once per group of methods, each worker with ``--methods GROUP --workers 1`` and the same
    ``--out``, all at once; returns what :func:`run_embedded` returns for every method.

    The workers share nothing but files: each method checkpoints under ``<out>/ckpt/<method>``
    (one writer per folder), the benchmark's cache is drawn here before they start, and each
    worker writes its part of the results to ``<out>/workers/worker<k>.json`` and its output
    to ``worker<k>.log`` beside it. The workers inherit this process's environment, XLA's
    settings included, so they compile the programs of one process and compute its numbers
    bit for bit: fewer XLA threads a worker (``--xla_cpu_multi_thread_eigen=false``, or a
    worker pinned to fewer cores) would change how the matrix products are summed, and the
    trained weights with it. XLA's pool stays mostly idle here (a process keeps about one
    core busy), so N workers keep about N cores busy. A worker that fails stops the others
    and raises its error here.

    Raises:
      RuntimeError: a worker failed (its exit code and the end of its log), or the workers
        disagree on the zero-shot accuracies.
    """
    out = Path(cfg.out)
    logs = out / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    _draw_benchmark(cfg)
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "CLJAX_NO_PROGRESS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    print(f"{len(groups)} workers: " + "; ".join(" ".join(g) for g in groups) + f" (logs: {logs})")
    procs, files = [], []
    try:
        for k, group in enumerate(groups):
            record = logs / f"worker{k}.json"
            record.unlink(missing_ok=True)
            log = open(logs / f"worker{k}.log", "w")  # noqa: SIM115 (closed below)
            files.append(log)
            cmd = [*(command or (sys.executable, "-m", "experiments.zscl")), *argv]
            cmd += ["--methods", *group, "--workers", "1"]
            procs.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**env, WORKER_RECORD: str(record)},
                )
            )
        total = len(cfg.methods) * len(cfg.seeds) * len(cfg.tasks)
        bar = _common.progress(None, "tasks", total=total)
        while any(p.poll() is None for p in procs):
            failed = [k for k, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                break
            bar.n = _tasks_done(out, cfg)
            bar.refresh()
            time.sleep(0.25)
        bar.close()
        for k, p in enumerate(procs):
            if p.poll() not in (None, 0):
                raise RuntimeError(
                    f"worker {k} (--methods {' '.join(groups[k])}) failed with exit code "
                    f"{p.returncode}; the end of {logs / f'worker{k}.log'}:\n"
                    + _tail(logs / f"worker{k}.log")
                )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
            if p.stdin is not None:
                p.stdin.close()
        for f in files:
            f.close()
    parts = []
    for k in range(len(groups)):
        record = logs / f"worker{k}.json"
        if not record.is_file():
            raise RuntimeError(f"worker {k} ended without writing {record}")
        parts.append(json.loads(record.read_text()))
    return _merge(cfg, groups, parts)


def _tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` non-blank lines of a log (progress bars' carriage returns split)."""
    text = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join([line for line in text if line.strip()][-lines:])


def _merge(
    cfg: EmbeddedConfig, groups: list[tuple[str, ...]], parts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The workers' parts as one process's results: the runs in the order of ``cfg.methods``."""
    first = parts[0]
    for k, part in enumerate(parts[1:], 1):
        if part["zero_shot"] != first["zero_shot"]:
            raise RuntimeError(
                f"workers 0 and {k} disagree on the zero-shot accuracies "
                f"({first['zero_shot']} vs {part['zero_shot']}); run with --workers 1"
            )
    owner = {m: part for part, g in zip(parts, groups, strict=True) for m in g}
    return {
        "config": dataclasses.asdict(cfg),
        "tasks": first["tasks"],
        "reference": first["reference"],
        "zero_shot": first["zero_shot"],
        "setup_seconds": max(p["setup_seconds"] for p in parts),
        "setup_cpu_seconds": sum(p["setup_cpu_seconds"] for p in parts),
        "runs": {m: owner[m]["runs"][m] for m in cfg.methods},
        "seconds_per_method": {m: owner[m]["seconds_per_method"][m] for m in cfg.methods},
        "cpu_seconds_per_method": {m: owner[m]["cpu_seconds_per_method"][m] for m in cfg.methods},
        "workers": [
            {"methods": list(g), "seconds": p["seconds"], "cpu_seconds": p["cpu_seconds"]}
            for g, p in zip(groups, parts, strict=True)
        ],
    }


# Every preset of the three settings; ``--preset NAME --help`` lists that setting's flags.
PRESET_NAMES = (*EMBEDDED_PRESETS, *DIGIT_PRESETS, "mtil", "mtil-tiny")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset or EmbeddedConfig.preset
    if preset in ("mtil", "mtil-tiny"):  # CLIP on the MTIL datasets
        from experiments import clip_zscl

        return clip_zscl.main(preset, argv)
    if preset in DIGIT_PRESETS:
        return _main_digits(preset, argv)
    if preset not in EMBEDDED_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESET_NAMES)}")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            f"presets: {', '.join(EMBEDDED_PRESETS)} (MiniCLIP, the flags above); "
            f"{', '.join(DIGIT_PRESETS)} (the MLP setting) and mtil, mtil-tiny (CLIP): "
            "--preset NAME --help lists their flags"
        ),
    )
    _common.add_config_flags(parser, EmbeddedConfig, presets=PRESET_NAMES)
    args = parser.parse_args(argv)
    base = dataclasses.replace(EmbeddedConfig(), preset=preset, **EMBEDDED_PRESETS[preset])
    if preset != "default" and args.out is None:
        base = dataclasses.replace(base, out=f"runs/zscl_{preset}")
    cfg = _common.config_from_flags(base, args)
    _check_embedded(cfg)  # before any work, also before the workers start
    t0 = time.perf_counter()
    record = os.environ.get(WORKER_RECORD)
    if record:  # a worker of a --workers run: its methods, its part of the results, no table
        _watch_parent()
        results = run_embedded(cfg)
        results["seconds"] = time.perf_counter() - t0
        results["cpu_seconds"] = time.process_time()
        _common.write_json(record, results)
        return results
    groups = split_methods(tuple(cfg.methods), num_workers(cfg))
    if len(groups) > 1:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        results = run_workers(cfg, list(sys.argv[1:] if argv is None else argv), groups)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        workers_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    else:
        results, workers_cpu = run_embedded(cfg), 0.0
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = time.process_time() + workers_cpu  # this process and its workers
    table, rows = summarize(results)
    results["table"] = rows
    results["targets"] = _targets(results)
    if _common.is_primary():
        out = Path(cfg.out)
        print(f"\nZSCL / MTIL on MiniCLIP, tasks {results['tasks']}, seeds {cfg.seeds}\n")
        print(table)
        if results["targets"]:
            print("\n" + _common.format_table(results["targets"]))
        print("\n" + matrices(results))
        print(f"\nzero-shot row: {np.round(results['zero_shot'], 1).tolist()}")
        print(f"total {results['seconds']:.0f}s wall, {results['cpu_seconds']:.0f}s CPU")
        _common.write_json(out / "results.json", results)
        _plots(results, out, title="ZSCL / MTIL on MiniCLIP")
    return results


def _main_digits(preset: str, argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    base = dataclasses.replace(Config(), preset=preset, **DIGIT_PRESETS[preset])
    if preset != "digits" and args.out is None:
        base = dataclasses.replace(base, out=f"runs/zscl_{preset}")
    cfg = _common.config_from_flags(base, args)
    t0 = time.perf_counter()
    results = run(cfg)
    results["seconds"] = time.perf_counter() - t0
    table, rows = summarize(results)
    results["table"] = rows
    if _common.is_primary():
        out = Path(cfg.out)
        print(f"\nZSCL on {len(results['tasks'])} tasks {results['tasks']}, seeds {cfg.seeds}\n")
        print(table)
        print("\n" + matrices(results))
        print(f"\nzero-shot row: {np.round(results['zero_shot'], 1).tolist()}")
        print(f"total {results['seconds']:.0f}s")
        _common.write_json(out / "results.json", results)
        _plots(results, out, title="MTIL-style digits: ZSCL")
    return results


if __name__ == "__main__":
    main()
