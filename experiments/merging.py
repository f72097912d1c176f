"""Model merging on the embedded foundation: the main job of ``make demo``.

The 8-task CLIP merging benchmark (task vectors, TIES, DARE) in miniature: MiniCLIP, the
CLIP pretrained by cljax on its procedural corpus and shipped inside the package, is evaluated
on the 8 tasks of :func:`cljax.data.embedded_benchmark` with *zero-shot heads* (each task's
class names in its prompt templates through the pretrained text tower; frozen, never merged).
Its image encoder is fine-tuned on each task with the task-vectors recipe (AdamW, warm-up then
cosine, gradient clipping, the zero-shot head frozen), and the fine-tuned encoders are merged
with task arithmetic, TIES (both conventions), DARE + task arithmetic and the uniform
average. Every merge coefficient λ is chosen on the validation splits (mean normalised
accuracy); the test splits are used once, for the table. The control task (drawn from the
pretraining distribution) is evaluated for every method too.

Command::

    python -m experiments.merging                    # the default preset (make demo)
    python -m experiments.merging --preset tiny      # the smoke-test preset (seconds)
    python -m experiments.merging --preset digits    # the former digit benchmark (a ViT
                                                     # pretrained here on one digit task)
    python -m experiments.merging --finetune_steps 400 --out runs/merging-long

Runtime and expected result: see the results page (``docs/results/merging.md``); a re-run
restores every checkpoint and only evaluates.

Stages are cached under ``<out>/ckpt/`` with :class:`cljax.checkpoint.CheckpointManager`
(one fine-tune per task; each folder name carries a hash of the settings and of the
pretrained weights it depends on, so a changed setting retrains only what it changes). A
killed run resumes from the last saved step of the stage it was in. The benchmark's images
are cached under ``<out>/data/``. The pool is built in ``experiments/_merging_pool.py``; this
module holds the settings, the merges and the tables.

Reuse by other experiments (aTLAS, ZSCL)::

    from experiments.merging import PRESETS, build_pool

    pool = build_pool(PRESETS["default"], "runs/merging")  # trains or restores from the cache
    pool.encoder            # flax module: uint8 images -> L2-normalised image features
    pool.pretrained         # θ_0, the image encoder's params (vision_model, visual_projection)
    pool.heads["letters"]   # {"kernel": [D, C], "bias": [C]}, the frozen zero-shot head
    pool.tasks              # tuple of cljax.data.Task
    pool.source             # the control task (its head: pool.heads["control"])
    pool.finetuned          # tuple of θ_t, one per task, in task order
    pool.task_vectors       # tuple of τ_t = θ_t − θ_0
    pool.evaluate(params, "letters", "val")      # accuracy in %
    pool.evaluate_all(params, "test")            # {task: accuracy}
    pool.logits(params, "letters", x)            # jit-able: encoder + frozen head
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from cljax import merging
from cljax.data import EMBEDDED_TASKS
from experiments import _common
from experiments._merging_pool import (  # noqa: F401 (the tests call the private ones)
    Pool,
    ZeroShotEncoder,
    _fit_head,
    _pad_head,
    _train,
    build_pool,
)

__all__ = ["PRESETS", "Config", "Pool", "ZeroShotEncoder", "build_pool", "main", "run"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the merging experiment (the default is the embedded ``make demo`` preset)."""

    preset: str = "default"
    out: str = "runs/merging"
    seed: int = 0
    # "embedded": MiniCLIP and cljax.data.embedded_benchmark (zero-shot heads from the text
    # tower); "digits": a ViT pretrained here on one digit task and merging_benchmark.
    benchmark: str = "embedded"
    clip_path: str = ""  # a Hugging Face CLIP folder; default: the embedded MiniCLIP
    tasks: tuple[str, ...] = EMBEDDED_TASKS
    train_size: int = 2000
    val_size: int = 100
    test_size: int = 500
    source_size: int = 1000
    workers: int = 2  # processes that draw the embedded benchmark (the images do not change)
    # Encoder (cljax.models.ViT).
    patch_size: int = 7
    hidden_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    # Pretraining on the source task, with a temporary head (discarded afterwards).
    pretrain_steps: int = 800
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 128
    # Frozen heads: L2-regularised logistic regression on pretrained features.
    head_l2: float = 1e-2
    # Fine-tuning (task vectors' recipe scaled down: AdamW, warm-up then cosine, clip 1.0,
    # the zero-shot head frozen).
    finetune_steps: int = 100
    finetune_lr: float = 2e-4
    finetune_batch: int = 32
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    clip_norm: float = 1.0
    save_every: int = 200
    # Merging.
    ties_density: float = 0.2
    dare_drop_rate: float = 0.5
    eval_batch: int = 500


_DIGITS = Config(
    preset="digits",
    out="runs/merging-digits",
    benchmark="digits",
    tasks=("mnist", "rotated", "flipped", "patches", "digits", "parity"),
    train_size=1000,
    finetune_steps=200,
    finetune_lr=1e-4,
    finetune_batch=64,
)
PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        out="runs/merging-tiny",
        tasks=("mnist", "letters", "textures"),
        train_size=64,
        val_size=16,
        test_size=32,
        finetune_steps=4,
        finetune_batch=16,
        save_every=2,
        eval_batch=64,
    ),
    "digits": _DIGITS,
    "digits-tiny": dataclasses.replace(
        _DIGITS,
        preset="digits-tiny",
        out="runs/merging-digits-tiny",
        tasks=("mnist", "rotated", "parity"),
        train_size=60,
        test_size=40,
        source_size=100,
        hidden_dim=16,
        depth=1,
        num_heads=2,
        mlp_dim=32,
        pretrain_steps=10,
        pretrain_batch=32,
        finetune_steps=6,
        finetune_batch=16,
        save_every=4,
        eval_batch=64,
    ),
}


# ---------------------------------------------------------------------------------------------
# Merging and evaluation.

TIES_MEAN_GRID: tuple[float, ...] = tuple(round(0.8 + 0.1 * i, 1) for i in range(18))  # 0.8..2.5


def _normalized(acc: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    return {k: 100.0 * acc[k] / max(reference[k], 1e-9) for k in acc}


def _mean(d: dict[str, float]) -> float:
    return float(np.mean(list(d.values())))


def run(config: Config) -> dict:
    """Builds the pool, merges, evaluates; writes ``results.json`` and the chart; returns results."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(config.out)
    pool = build_pool(config, out)
    t_pool = time.perf_counter() - t0
    names = pool.names

    ft_val = {n: pool.evaluate(p, n, "val") for n, p in zip(names, pool.finetuned, strict=True)}
    ft_test = {n: pool.evaluate(p, n, "test") for n, p in zip(names, pool.finetuned, strict=True)}
    taus = pool.task_vectors
    theta0 = pool.pretrained

    def val_score(params) -> float:
        return _mean(_normalized(pool.evaluate_all(params, "val"), ft_val))

    # Merges run on the raveled parameter vector (one leaf of N entries; a stacked [T, N]
    # array for the task vectors). Global TIES is the same method on a tree or on its raveled
    # vector; DARE draws its independent Bernoulli masks per task over all N entries at once.
    # One leaf instead of dozens keeps the merges' compile time small on a CPU.
    flat0, unravel = ravel_pytree(theta0)
    flat_taus = jnp.stack([ravel_pytree(t)[0] for t in taus])
    flat_ft = jnp.stack([ravel_pytree(p)[0] for p in pool.finetuned])
    # Every method below is θ_0 + λ·τ_m with τ_m computed once at λ = 1 (they are linear in
    # λ), so TIES trimming and DARE masks run once per method, not once per grid point.
    at = jax.jit(lambda tau_m, lam: unravel(merging.apply(flat0, tau_m, lam)))
    density = config.ties_density
    dropped = merging.dare(flat_taus, drop_rate=config.dare_drop_rate, key=config.seed)
    directions = {
        "task arithmetic": (merging.task_arithmetic(flat0, flat_taus, 1.0), None),
        "TIES (mean)": (merging.ties(flat0, flat_taus, density=density), TIES_MEAN_GRID),
        "TIES (sum)": (merging.ties(flat0, flat_taus, density=density, merge="sum"), None),
        "DARE + TA": (merging.task_arithmetic(flat0, dropped, 1.0), None),
    }
    rows: dict[str, dict] = {
        "pretrained": {"scale": None, "test": pool.evaluate_all(theta0, "test")},
        "fine-tuned": {"scale": None, "test": ft_test},
    }
    for name, (merged, grid) in _common.progress(directions.items(), desc="merge"):
        tau_m = merged - flat0
        lam, scores = merging.select_scale(lambda s, t=tau_m: val_score(at(t, s)), grid)
        rows[name] = {
            "tau": tau_m,
            "scale": float(lam),
            "grid": list(merging.DEFAULT_GRID if grid is None else grid),
            "val_scores": [float(s) for s in scores],
            "test": pool.evaluate_all(at(tau_m, lam), "test"),
        }
    average = unravel(merging.average(flat_ft))
    rows["average"] = {"scale": None, "test": pool.evaluate_all(average, "test")}
    for r in rows.values():
        r["mean"] = _mean(r["test"])
        r["normalized"] = _normalized(r["test"], ft_test)
        r["normalized_mean"] = _mean(r["normalized"])
    control = None
    if "control" in pool.heads:  # the embedded benchmark: accuracy on the pretraining distribution
        merged = {"pretrained": theta0, "average": average}
        merged |= {n: at(rows[n]["tau"], rows[n]["scale"]) for n in directions}
        control = {m: pool.evaluate(p, "control", "test") for m, p in merged.items()}
        per_task = {
            n: pool.evaluate(p, "control", "test")
            for n, p in zip(names, pool.finetuned, strict=True)
        }
        control["fine-tuned"] = _mean(per_task)
        control["fine-tuned (per task)"] = per_task
    for r in rows.values():
        r.pop("tau", None)

    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    results = {
        "config": dataclasses.asdict(config),
        "tasks": list(names),
        "methods": rows,
        "control": control,
        "stages": pool.stages,
        "time": {"wall_s": wall, "cpu_s": cpu, "pool_wall_s": t_pool},
    }
    if _common.is_primary():
        _common.write_json(out / "results.json", results)
        _common.bar_chart(
            out / "accuracy.png",
            [*names, "mean"],
            {m: [*r["test"].values(), r["mean"]] for m, r in rows.items()},
            title=f"Merging on the {config.benchmark} benchmark (test accuracy)",
        )
        print(format_results(results))
        print(f"\nwall {wall:.0f} s, CPU {cpu:.0f} s; wrote {out / 'results.json'}")
    return results


def format_results(results: dict) -> str:
    """Two markdown tables: absolute test accuracy and normalised accuracy (%), per task."""
    names = results["tasks"]
    absolute, normalized = [], []
    control = results.get("control") or {}
    for method, r in results["methods"].items():
        lam = "" if r["scale"] is None else f"{r['scale']:.2f}"
        row = {"method": method, **r["test"], "mean": r["mean"], "λ": lam}
        if control:
            row["control"] = control[method]
        absolute.append(row)
        normalized.append({"method": method, **r["normalized"], "mean": r["normalized_mean"]})
    extra = ["control"] if control else []
    return (
        "Absolute test accuracy (%)\n\n"
        + _common.format_table(absolute, ["method", *names, "mean", "λ", *extra])
        + "\n\nNormalised accuracy (% of each task's fine-tuned model)\n\n"
        + _common.format_table(normalized, ["method", *names, "mean"])
    )


def main(argv: list[str] | None = None) -> dict:
    """Parses flags (``--preset``, then any field of :class:`Config`) and runs.

    ``--preset clip-vit-b32`` (or ``clip-tiny``) runs the real-scale CLIP benchmark of
    :mod:`experiments.clip_merging` with its own flags.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    if known.preset and known.preset.startswith("clip-"):
        from experiments import clip_merging

        clip_parser = argparse.ArgumentParser(description=clip_merging.__doc__.split("\n", 1)[0])
        _common.add_config_flags(clip_parser, clip_merging.ClipConfig)
        return clip_merging.main(known.preset, clip_parser.parse_args(argv))
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    preset = args.preset or ("tiny" if os.environ.get("CLJAX_TINY") == "1" else "default")
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    config = _common.config_from_flags(PRESETS[preset], args)
    return run(config)


if __name__ == "__main__":
    main()
