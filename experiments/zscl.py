"""ZSCL / MTIL on MiniCLIP: does distillation + weight ensembling keep the zero-shot transfer
of a CLIP while it learns a sequence of tasks?

Command::

    python -m experiments.zscl                        # MiniCLIP, embedded benchmark, 3 seeds
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

Runtime and results: ``docs/results/zscl.md`` (the default preset is about 1,400 s of CPU time,
mostly on one core; ``--preset tiny`` in CPU seconds plus compiles).

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
from experiments._zscl_embedded import REFERENCE_SEED, _check_embedded, _embedded_env
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
                if k not in ("methods", "out", "seeds", "eval_batch_size")
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
    t0 = time.perf_counter()
    results = run_embedded(cfg)
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = time.process_time()
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
