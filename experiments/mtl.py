"""Multi-task learning with and without F-MTL on Multi-MNIST, with paired significance.

Trains a shared trunk with a linear head per task under six gradient aggregators (EW,
MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL), each plain and with F-MTL (per-task
sharpness-aware perturbations, loss and flatness directions aggregated separately), and
the single-task models that Δm% is measured against, over several seeds. Each
aggregator runs inside optax: per-task gradients from ``mtl.task_grad_fn`` (or
``mtl.fmtl_grad_fn``) and ``optax.chain(mtl.aggregate(aggregator,
head_rules=HEAD_RULES), adam)``, the aggregator's key in the optimiser state (set from
the run's seed).

Task sets (``--datasets``), all built from data in the package (no download):

* ``multi_mnist_gen`` (default): Multi-MNIST as the papers build it
  (``cljax.data.generate_multi_mnist``: 36×36, one digit up-left and one down-right,
  the right box 4 to 8 px below and right of the left one, 6 on average as in the
  paper (``--max_shift 4``: 0 to 8 px apart, a harder layout), max-merge; real MNIST
  digits and glyphs of held-out fonts; splits with disjoint digits; rendered on access),
  tasks "left" and "right";
* ``multi_mnist``: the older embedded Multi-MNIST (``load_multi_mnist``, 3,000 images);
* ``mnist_attributes``: digits rotated by k·90°, tasks "digit", "rotation", "parity";
* ``multi_shapes``: the Multi-Fashion analogue (``cljax.data.generate_multi_shapes``:
  Multi-MNIST's layout, ``--max_shift`` included, over ten textured shapes instead of
  digits), tasks "left", "right";
* ``glyph_attributes``: one coloured, styled digit glyph per image
  (``cljax.data.generate_glyph_attributes``; 32×32 RGB), tasks "content", "colour",
  "style".

The generated sets (``multi_mnist_gen``, ``multi_shapes``, ``glyph_attributes``) take
``--num_train``, ``--num_val`` and ``--num_test``.

Presets (``--preset``):

* ``default``: ``multi_mnist_gen`` with 10,000 training, 1,000 validation and 5,000
  test images; the LeNet of the F-MTL code (9×9 conv 10, pool, 5×5 conv 20, pool, dense
  50); one pass at batch 32, Adam 3e-3 with cosine decay; F-MTL with SAM ρ=0.05 (the
  code's default) and joint normalisation; seeds 0-4. Meant for about 20 minutes on two
  idle CPU cores (not verified on an idle machine), a short budget (see
  ``docs/results/mtl.md``).
* ``long``: ``default`` with three passes over 60,000 training images at batch 256
  (702 steps), Adam 5e-3 with cosine decay: large batches use a CPU better per image
  than batch 32; the single-task models pass 90 % mean accuracy (see
  ``docs/results/mtl.md``); hours of CPU per seed for all fourteen variants. Writes to
  ``runs/mtl_long``.
* ``paper``: the budget of the F-MTL code's Multi-MNIST runs (``multi-mnist/run.sh`` of
  github.com/VietHoang1512/FS-MTL): 120,000 training images, 200 epochs of batch 256,
  Adam 1e-3, ASAM ρ=2; days of CPU, meant for an accelerator.
* ``embedded``: the earlier preset (MLP trunk, ``multi_mnist`` and ``mnist_attributes``,
  3 seeds, 5 epochs) whose tables ``docs/results/mtl.md`` keeps.
* ``tiny``: a smoke test (seconds).

``--methods none`` trains the single-task models only (e.g. ``--methods none --seeds 0
--num_train 60000 --epochs 3`` for the single-task accuracy at a larger budget).

Command::

    python -m experiments.mtl                 # the default preset
    python -m experiments.mtl --preset tiny   # smoke test

Runs go seed by seed (all variants of seed 0, then seed 1, ...), and each finished run is
saved under ``--out``: a re-run resumes, and a run stopped part-way leaves whole seeds,
so the paired comparisons use every seed that finished. With ``--checkpoint_every N`` a
run in progress is also saved every N steps and at each epoch end, and resumes from there
(bit-identically). ``--merge DIR ...`` adds the finished runs of other ``--out`` folders of
the same configuration. A damaged record of finished runs, here or in a merged folder, is
moved aside with a warning and the one before it read; the runs it alone held are trained
again (a merged folder with no readable record is skipped, with a warning).

Reported: test accuracy at the epoch of best mean validation accuracy; Δm% against the
mean single-task accuracy (Maninis et al., CVPR 2019); for each aggregator the paired
difference F-variant minus base on the same seed (Δm points and mean accuracy), its mean
and 95 % t-interval over the seeds. Outputs under ``--out`` (default ``runs/mtl``):
``results.json`` (every run, the summary rows and the paired differences),
``mtl_<dataset>.png`` (Δm% per method, and the paired differences with their intervals)
and printed markdown tables.

The trunks and the training loop live in ``experiments/_mtl_train.py``, the tables and
figure in ``experiments/_mtl_report.py``; this module holds the settings and the run.

References:
  Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions",
  arXiv 2211.13723 (F-MTL; code github.com/VietHoang1512/FS-MTL). Sener & Koltun,
  "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (Multi-MNIST).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import optax
import scipy.stats

from cljax import mtl
from cljax.checkpoint import CheckpointManager
from cljax.data import (
    generate_glyph_attributes,
    generate_multi_mnist,
    generate_multi_shapes,
    load_mnist_attributes,
    load_multi_mnist,
)
from experiments import _common as C
from experiments._mtl_report import figure, write_report  # noqa: F401 (figure re-exported)
from experiments._mtl_train import (  # noqa: F401 (re-exported: tests and benchmarks use them)
    TRUNKS,
    LeNet,
    MLPTrunk,
    Trunk,
    _reseed,
    make_loss,
    train_one,
)


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    datasets: tuple[str, ...] = ("multi_mnist_gen",)
    methods: tuple[str, ...] = ("ew", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    num_samples: int = 3000  # multi_mnist (embedded): images (train 70 %, val 10 %, test 20 %)
    attribute_samples: int = 3000  # of the 5,000 MNIST-5k digits, for mnist_attributes
    num_train: int = 10000  # multi_mnist_gen: training images (rendered on access)
    num_val: int = 1000  # multi_mnist_gen: validation images
    num_test: int = 5000  # multi_mnist_gen: test images
    # multi_mnist_gen, multi_shapes: largest shift (2: boxes 4-8 px apart, the paper's 6 on average)
    max_shift: int = 2
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 3e-3
    schedule: str = "cosine"  # "constant", or "cosine": decay to 0 over the run's steps
    rho: float = 0.05
    adaptive: bool = False
    normalization: str = "joint"
    trunk: str = "lenet"  # "lenet" (the F-MTL code's), "conv" (5x5 LeNet-like) or "mlp"
    unroll: bool = True  # per-task backward passes one at a time, unrolled (faster on CPU)
    train: bool = True  # False: only summarise the runs found in the checkpoint
    width: int = 10  # lenet: conv channels width, 2*width, dense 5*width (paper: 10)
    checkpoint_every: int = 0  # > 0: save a run in progress every N steps and each epoch
    merge: tuple[str, ...] = ()  # other --out folders whose finished runs (same config) count
    out: str = "runs/mtl"


PRESETS = {
    "default": Config(),
    # A long CPU budget: three passes over 60,000 images at batch 256 (702 steps), Adam
    # 5e-3 with cosine decay.
    "long": Config(
        preset="long",
        num_train=60000,
        epochs=3,
        batch_size=256,
        learning_rate=5e-3,
        out="runs/mtl_long",
    ),
    # The F-MTL code's Multi-MNIST run (multi-mnist/run.sh): 120,000 training images,
    # 200 epochs of batch 256, Adam 1e-3, ASAM rho=2.
    "paper": Config(
        preset="paper",
        num_train=120000,
        num_val=10000,
        num_test=20000,
        epochs=200,
        batch_size=256,
        learning_rate=1e-3,
        schedule="constant",
        rho=2.0,
        adaptive=True,
    ),
    # The earlier embedded preset: an MLP on 2,100 Multi-MNIST images and MNIST attributes.
    "embedded": Config(
        preset="embedded",
        datasets=("multi_mnist", "mnist_attributes"),
        seeds=(0, 1, 2),
        epochs=5,
        batch_size=128,
        learning_rate=1e-3,
        schedule="constant",
        trunk="mlp",
        unroll=False,
        width=8,
    ),
    "tiny": Config(
        preset="tiny",
        datasets=("multi_mnist",),
        methods=("mgda",),
        seeds=(0,),
        num_samples=300,
        attribute_samples=300,
        num_train=256,
        num_val=64,
        num_test=64,
        epochs=1,
        batch_size=32,
        learning_rate=1e-3,
        schedule="constant",
        trunk="mlp",
        unroll=False,
        width=4,
    ),
}

AGGREGATORS = {
    "ew": mtl.linear,
    "mgda": mtl.mgda,
    "pcgrad": mtl.pcgrad,
    "cagrad": functools.partial(mtl.cagrad, c=0.4),
    "imtl_g": mtl.imtl_g,
    "nash_mtl": mtl.nash_mtl,
}
LABELS = {
    "ew": "EW",
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "imtl_g": "IMTL-G",
    "nash_mtl": "Nash-MTL",
}


DATASETS = (
    "multi_mnist_gen",
    "multi_mnist",
    "mnist_attributes",
    "multi_shapes",
    "glyph_attributes",
)


def load(name: str, cfg: Config):
    if name == "multi_mnist":
        return load_multi_mnist(cfg.num_samples, seed=0)
    if name == "multi_mnist_gen":
        return generate_multi_mnist(
            cfg.num_train, cfg.num_val, cfg.num_test, max_shift=cfg.max_shift, seed=0
        )
    tiny = cfg.preset == "tiny"  # small pools of objects: the smoke test renders in seconds
    if name == "multi_shapes":
        per_class = 10 if tiny else 500
        return generate_multi_shapes(
            cfg.num_train,
            cfg.num_val,
            cfg.num_test,
            objects_per_class=per_class,
            max_shift=cfg.max_shift,
            seed=0,
        )
    if name == "glyph_attributes":
        per_class = 10 if tiny else 100
        return generate_glyph_attributes(
            cfg.num_train, cfg.num_val, cfg.num_test, glyphs_per_class=per_class, seed=0
        )
    if name == "mnist_attributes":
        tasks = load_mnist_attributes(seed=0)
        if cfg.preset == "tiny":
            tasks = tuple(
                dataclasses.replace(
                    t,
                    **{
                        f"{a}_{s}": getattr(t, f"{a}_{s}")[:100]
                        for a in "xy"
                        for s in ("train", "val", "test")
                    },
                )
                for t in tasks
            )
        return tasks
    raise ValueError(f"mtl: unknown dataset {name!r}; known: {sorted(DATASETS)}")


def optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    """Adam at ``cfg.learning_rate``, constant or cosine-decayed to 0 over ``total_steps``."""
    if cfg.schedule == "constant":
        return optax.adam(cfg.learning_rate)
    if cfg.schedule == "cosine":
        return optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps, 1)))
    raise ValueError(f"mtl: schedule={cfg.schedule!r} must be 'constant' or 'cosine'")


def paired_ci(diffs, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided t-interval: ``(mean, low, high)``.

    ``mean ± t_{(1+level)/2, n-1} · s / sqrt(n)`` with ``s`` the sample standard deviation
    (ddof 1) of the ``n`` per-seed differences; NaN bounds for ``n < 2``.
    """
    d = np.asarray(diffs, np.float64)
    mean = float(d.mean()) if d.size else float("nan")
    if d.size < 2:
        return mean, float("nan"), float("nan")
    half = float(scipy.stats.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return mean, mean - half, mean + half


def _methods(cfg: Config) -> tuple[str, ...]:
    """The aggregators to run; ``("none",)`` runs the single-task baselines only."""
    if cfg.methods == ("none",):
        return ()
    bad = [m for m in cfg.methods if m not in AGGREGATORS]
    if bad:
        raise ValueError(f"mtl: unknown methods {bad}; known: {sorted(AGGREGATORS)} or 'none'")
    return cfg.methods


def _fingerprint(cfg: Config) -> dict:
    """What shapes a run: finished runs are reused only where it is unchanged."""
    fields = ("num_samples", "attribute_samples", "epochs", "batch_size", "learning_rate")
    fields += ("rho", "adaptive", "normalization", "trunk", "width")
    fields += ("num_train", "num_val", "num_test", "schedule", "unroll", "max_shift")
    return {f: getattr(cfg, f) for f in fields}


def run(cfg: Config) -> dict:
    _methods(cfg)  # validates the names before anything trains
    bad = [d for d in cfg.datasets if d not in DATASETS]
    if bad:
        raise ValueError(f"mtl: unknown datasets {bad}; known: {sorted(DATASETS)}")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"mtl: checkpoint_every={cfg.checkpoint_every} must be >= 0 (0: off)")
    out = Path(cfg.out)
    ckpt = CheckpointManager(out / "ckpt", keep=2)
    done: dict = {}
    restored = ckpt.restore_latest({"count": np.zeros((), np.int32)})
    fingerprint = _fingerprint(cfg)
    if restored is not None and restored[2].get("config", fingerprint) == fingerprint:
        done = dict(restored[2].get("runs", {}))
    count = 0 if restored is None else restored[0]
    for other in cfg.merge:  # finished runs of the same configuration, from other folders
        got, folder = None, Path(other) / "ckpt"
        if folder.is_dir():
            # a damaged record is moved aside there with a warning, and the one before it read
            got = CheckpointManager(folder, keep=2).restore_latest(
                {"count": np.zeros((), np.int32)}
            )
        if got is None and folder.is_dir() and any(folder.glob(".corrupt-*")):
            warnings.warn(
                f"mtl: merge folder {other!r} has no readable run record, only damaged ones "
                f"(moved aside in {folder}); its runs are not merged but trained here",
                stacklevel=2,
            )
            continue
        if got is None or got[2].get("config") != fingerprint:
            raise ValueError(f"mtl: merge folder {other!r} holds no runs of this configuration")
        for k, v in got[2].get("runs", {}).items():
            done.setdefault(k, v)
    # runs in progress (--checkpoint_every), in a folder of this configuration
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    partial = out / "partial" / digest

    def record(key, value):
        nonlocal count
        done[key] = value
        count += 1
        meta = {"runs": done, "config": fingerprint}
        ckpt.save(count, {"count": np.asarray(count, np.int32)}, metadata=meta)

    fmtl_kw = dict(rho=cfg.rho, adaptive=cfg.adaptive, normalization=cfg.normalization)
    loop_kw = dict(task_batch_size=1, unroll=True) if cfg.unroll else {}
    summary, paired = {}, {}
    for ds in cfg.datasets:
        tasks = load(ds, cfg)
        t = len(tasks)
        ncls = [task.num_classes for task in tasks]
        opt = optimizer(cfg, tasks[0].steps_per_epoch(cfg.batch_size) * cfg.epochs)
        variants = [("stl", k) for k in range(t)]
        variants += [(p + m, None) for m in _methods(cfg) for p in ("", "f-")]
        built = {}
        for name, k in variants:
            ids = (k,) if name == "stl" else tuple(range(t))
            model = mtl.MultiHead(TRUNKS[cfg.trunk](cfg.width), tuple(ncls[i] for i in ids))
            loss_fn = make_loss(model, ids)
            common = dict(head_rules=mtl.HEAD_RULES, has_aux=True)
            if name == "stl":  # one task: plain Adam on the gradient of its loss
                grad_fn = mtl.mtl_grad_fn(loss_fn, None, **common)
                tx = opt
            else:  # the aggregator inside optax, its key in the optimiser state
                if name.startswith("f-"):
                    grad_fn = mtl.fmtl_grad_fn(loss_fn, **fmtl_kw, **common, **loop_kw)
                else:
                    grad_fn = mtl.task_grad_fn(loss_fn, has_aux=True, **loop_kw)
                agg = AGGREGATORS[name.removeprefix("f-")]
                # one transformation for all seeds (train_one sets the key from the seed), so
                # each variant's step compiles once
                tx = optax.chain(mtl.aggregate(agg, key=0, head_rules=mtl.HEAD_RULES), opt)
            predict = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
            # a non-finite step is skipped and counted (no host sync per step)
            step_fn = mtl.make_mtl_step(grad_fn, nonfinite="skip")
            built[name, k] = (ids, step_fn, predict, model, tx)
        # seed by seed, so that a run stopped part-way leaves whole seeds (paired comparisons)
        todo = [(seed, v) for seed in cfg.seeds for v in variants]
        for seed, (name, k) in C.progress(todo, desc=ds):
            ids, step_fn, predict, model, tx = built[name, k]
            key = f"{ds}/{name}{'' if k is None else k}/{seed}"
            if key in done or not cfg.train:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            kw = {"tx": tx}
            if cfg.checkpoint_every > 0:
                kw.update(
                    checkpoint_dir=partial / key.replace("/", "__"),
                    checkpoint_every=cfg.checkpoint_every,
                )
            res = train_one(cfg, tasks, ids, step_fn, predict, model, seed, **kw)
            res["seconds"] = time.perf_counter() - t0
            res["cpu_seconds"] = time.process_time() - c0
            record(key, res)
            if "checkpoint_dir" in kw:
                shutil.rmtree(kw["checkpoint_dir"], ignore_errors=True)
        summary[ds] = summarize(cfg, ds, tasks, done)
        paired[ds] = paired_differences(cfg, ds, tasks, done)
    return {
        "config": dataclasses.asdict(cfg),
        "runs": done,
        "summary": summary,
        "paired": paired,
    }


def summarize(cfg: Config, ds: str, tasks, done: dict) -> list[dict]:
    t = len(tasks)

    def runs(name):  # the finished seeds of a variant
        return [done[f"{ds}/{name}/{s}"] for s in cfg.seeds if f"{ds}/{name}/{s}" in done]

    if not all(runs(f"stl{k}") for k in range(t)):
        return []
    base = [np.mean([r["test"][0] for r in runs(f"stl{k}")]) for k in range(t)]
    rows = [
        {
            "dataset": ds,
            "method": "single-task",
            **{tasks[k].name: f"{base[k]:.2f}" for k in range(t)},
            "seeds": len(runs("stl0")),
            "mean acc": f"{np.mean(base):.2f}",
            "Δm%": "0",
            "_dm": 0.0,
            "_dm_std": 0.0,
        }
    ]
    for m in _methods(cfg):
        for prefix in ("", "f-"):
            found = runs(prefix + m)
            if not found:
                continue
            accs = np.array([r["test"] for r in found])
            dms = [mtl.delta_m(a, base) for a in accs]
            dm, dm_s = C.mean_std(dms)
            row = {
                "dataset": ds,
                "method": ("F-" if prefix else "") + LABELS[m],
                "seeds": len(found),
            }
            for k in range(t):
                mu, sd = C.mean_std(accs[:, k])
                row[tasks[k].name] = f"{mu:.2f} ± {sd:.2f}"
            mu, sd = C.mean_std(accs.mean(1))
            row["mean acc"] = f"{mu:.2f} ± {sd:.2f}"
            row["Δm%"] = f"{dm:+.2f} ± {dm_s:.2f}"
            row["_dm"], row["_dm_std"] = dm, dm_s
            rows.append(row)
    return rows


def _baseline(cfg: Config, ds: str, t: int, done: dict) -> list[float] | None:
    """Mean single-task test accuracy of each task over the finished seeds."""
    base = []
    for k in range(t):
        accs = [
            done[f"{ds}/stl{k}/{s}"]["test"][0] for s in cfg.seeds if f"{ds}/stl{k}/{s}" in done
        ]
        if not accs:
            return None
        base.append(float(np.mean(accs)))
    return base


def paired_differences(cfg: Config, ds: str, tasks, done: dict) -> list[dict]:
    """Per aggregator: F-variant minus base on the same seed, Δm% and mean accuracy, with
    the mean difference's 95 % t-interval over the seeds where both finished."""
    base = _baseline(cfg, ds, len(tasks), done)
    if base is None:
        return []
    out = []
    for m in _methods(cfg):
        seeds = [s for s in cfg.seeds if f"{ds}/{m}/{s}" in done and f"{ds}/f-{m}/{s}" in done]
        if not seeds:
            continue
        acc = lambda name, s: np.asarray(done[f"{ds}/{name}/{s}"]["test"])
        d_dm = [mtl.delta_m(acc("f-" + m, s), base) - mtl.delta_m(acc(m, s), base) for s in seeds]
        d_acc = [float(acc("f-" + m, s).mean() - acc(m, s).mean()) for s in seeds]
        dm, dm_lo, dm_hi = paired_ci(d_dm)
        da, da_lo, da_hi = paired_ci(d_acc)
        out.append(
            {
                "method": LABELS[m],
                "seeds": seeds,
                "dm_diffs": d_dm,
                "dm_diff": dm,
                "dm_ci": [dm_lo, dm_hi],
                "acc_diffs": d_acc,
                "acc_diff": da,
                "acc_ci": [da_lo, da_hi],
                "wins": int(np.sum(np.asarray(d_dm) > 0)),
            }
        )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    cfg = C.config_from_flags(PRESETS[args.preset or "default"], args)
    t0, c0 = time.perf_counter(), time.process_time()
    results = run(cfg)
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = time.process_time() - c0
    if C.is_primary():
        write_report(cfg, results, Path(cfg.out))
    return results


if __name__ == "__main__":
    main()
