"""Class-incremental learning from the pretrained MiniCLIP image encoder (CoSO's setting).

CoSO's class-incremental setting (Cheng et al. 2025, ``quinn-ch/CoSO``) on the embedded
foundation: a pretrained ViT, 10 stages of new classes, one growing head, no task id at test
time. The classes are 50 of the 54 classes of five embedded benchmark tasks (signs, textures,
scikit-learn digits, MNIST, shapes), in a seed-dependent order, 5 new classes a stage. As in the
reference, the trainable weights are the attention output projections of every block (its
``attn.proj``) and the head; each stage trains its new classes' head with the cross-entropy
over those classes only (``class_loss="new"``, logits divided by a temperature of 3) and the
test takes the argmax over every class seen so far. ``--head cosine`` replaces the reference's
linear head by a normalised one (a fixed scale times the cosine of the feature and each class
weight), so that no class's logits outgrow the others' through weight or feature norms; a
run record names its head, and a folder of one head's records refuses the other's.
``--imprint true`` (cosine head only) imprints the head (Qi, Brown and Lowe 2018, "Low-Shot
Learning with Imprinted Weights"): when a stage begins, each new class's head weight becomes
the normalised mean feature of its training images under the current parameters, so a new
class starts where the nearest-class-mean probe would put it instead of at a random direction
that a few steps hardly move; records name the setting like the head.

Methods: naive fine-tuning, EWC, LwF, GPM, CoSO and OSFT on the attention output projections,
PRD (prototype-sample relation distillation, replay-free: SupCon + prototypes + relation
distillation from the snapshot taken at each stage's end), and the nearest-class-mean probe
on the frozen encoder as reference. Reports mean +- std over seeds of ACC (final average
accuracy over stages) and BWT, writes ``results.json`` and accuracy-matrix heatmaps under
``--out``.

Command::

    python -m experiments.class_incremental                 # 7 methods + NCM x 3 seeds
    python -m experiments.class_incremental --preset tiny   # smoke test, seconds

A re-run with the same ``--out`` skips finished runs (``--summarize_only true`` only
tabulates); each finished run is a checksummed record under ``runs/``, and a damaged one is
moved aside (``.corrupt-<n>``) with a warning and its run done again. ``docs/results/continual.md`` holds the measured table.
"""

from __future__ import annotations

import os
import re

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cljax import continual as cl  # noqa: E402
from cljax import projection as pj  # noqa: E402
from cljax.checkpoint import load_json, quarantine_file, save_json  # noqa: E402
from cljax.data import Task, embedded_benchmark  # noqa: E402
from cljax.models import clip  # noqa: E402
from experiments import _common  # noqa: E402
from experiments.continual import heatmaps  # noqa: E402

METHODS = ("naive", "ewc", "lwf", "gpm", "coso", "osft", "prd", "ncm")
# The reference trains the attention output projection of every block (CoSO's "attn.proj").
ATTN_OUT = r"encoder/vision_model/encoder/layers_\d+/self_attn/out_proj/kernel"


@dataclasses.dataclass(frozen=True)
class Config:
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    # embedded benchmark tasks pooled (54 classes); the glyph tasks (greek, letters) are left
    # out: MiniCLIP's features hardly separate glyphs in held-out fonts (docs/results/merging.md)
    sources: tuple[str, ...] = ("signs", "textures", "digits", "mnist", "shapes")
    classes_per_stage: int = 5
    stages: int = 10
    train_per_class: int = 30
    test_per_class: int = 10
    steps_per_task: int = 20
    batch_size: int = 32
    lr: float = 3e-4  # the reference's lrate (attention projections)
    head_lr: float = 5e-4  # the reference's fc_lrate
    logit_temperature: float = 3.0  # the reference divides the logits by 3
    # "linear": the reference's fc head, logits / logit_temperature; "cosine": a normalised
    # head, cosine_scale x cos(feature, class weight), whose logits no class can outgrow
    head: str = "linear"
    cosine_scale: float = 16.0  # the cosine head's fixed scale (logit_temperature unused)
    # cosine head only: each stage's new head weights start as the normalised class means of
    # its training features under the current parameters (weight imprinting)
    imprint: bool = False
    ewc_strength: float = 1e4
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    gpm_threshold: float = 0.97
    gpm_samples: int = 125
    coso_proj_rank: int = 15
    coso_sketch_rank: int = 100
    coso_threshold: float = 0.98
    prd_temperature: float = 0.1
    prd_proto_weight: float = 4.0
    prd_distill_weight: float = 4.0
    summarize_only: bool = False  # tabulate the finished runs in --out, train nothing
    cache: str = "runs/embedded_cache"  # drawn benchmark tasks are cached here
    out: str = "runs/class_incremental"


PRESETS = {
    "default": Config(),
    "tiny": Config(
        methods=("naive", "ncm"),
        sources=("textures",),
        seeds=(0,),
        classes_per_stage=2,
        stages=2,
        train_per_class=8,
        test_per_class=4,
        steps_per_task=2,
        batch_size=8,
        gpm_samples=4,
        coso_sketch_rank=8,
        cache="",
        out="runs/class_incremental_tiny",
    ),
}


class Net(nn.Module):
    """MiniCLIP's image encoder, a growing linear head and PRD's projection head."""

    config: clip.CLIPConfig
    num_classes: int
    proj_dim: int = 64

    def setup(self):
        self.encoder = clip.CLIPImageEncoder(self.config)
        self.head = nn.Dense(self.num_classes, name="head")
        self.proj1 = nn.Dense(self.config.projection_dim, name="proj1")
        self.proj2 = nn.Dense(self.proj_dim, name="proj2")

    def features(self, x):
        return self.encoder(x)

    def project(self, f):
        return self.proj2(nn.relu(self.proj1(f)))

    def __call__(self, x):
        f = self.features(x)
        return self.head(f), self.project(f)


def stage_tasks(cfg: Config, seed: int) -> list[Task]:
    """The pooled classes of ``cfg.sources`` in a seed-dependent order, ``stages`` tasks."""
    n_cls = cfg.classes_per_stage * cfg.stages
    per_src = {"train": cfg.train_per_class, "test": cfg.test_per_class}
    bench = embedded_benchmark(
        seed,
        tasks=cfg.sources,
        # enough examples per class of the widest source (the draw is class-balanced)
        train_size=cfg.train_per_class * 30,
        val_size=1,
        test_size=cfg.test_per_class * 30,
        cache_dir=cfg.cache or None,
    )
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    names: list[str] = []
    for t in bench.tasks:
        for c in range(t.num_classes):
            for split in ("train", "test"):
                x, y = t.split(split)
                idx = np.flatnonzero(y == c)[: per_src[split]]
                if len(idx) < per_src[split]:
                    raise ValueError(
                        f"{t.name} class {c} has {len(idx)} {split} examples; need {per_src[split]}"
                    )
                xs[split].append(x[idx])
                ys[split].append(np.full(len(idx), len(names), np.int32))
            names.append(f"{t.name}:{t.classes[c]}")
    if n_cls > len(names):
        raise ValueError(f"{n_cls} classes asked for; the sources have {len(names)}")
    order = np.random.default_rng([seed, 77]).permutation(len(names))[:n_cls]
    tasks = []
    for s in range(cfg.stages):
        cls = order[s * cfg.classes_per_stage : (s + 1) * cfg.classes_per_stage]
        parts = {}
        for split in ("train", "test"):
            x = np.concatenate([xs[split][c] for c in cls])
            y = np.concatenate([np.full(len(xs[split][c]), k, np.int32) for k, c in enumerate(cls)])
            parts[split] = (np.asarray(clip.normalize_images(x)), y)
        tr, te = parts["train"], parts["test"]
        tasks.append(
            Task(f"stage-{s}", tuple(names[c] for c in cls), *tr, te[0][:1], te[1][:1], *te)
        )
    return tasks


def _label(path) -> str:
    p = "/".join(str(getattr(k, "key", k)) for k in path)
    if p.startswith(("head/", "proj1/", "proj2/")):
        return "head"
    return "enc" if re.fullmatch(ATTN_OUT, p) else "frozen"


def base_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Adam on the attention output projections and on the heads; the rest frozen."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: _label(path), params)

    return optax.multi_transform(
        {
            "enc": optax.adam(cfg.lr),
            "head": optax.adam(cfg.head_lr),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """A random view: shift by up to 3 pixels (edge padding) and scale the contrast."""
    n, h, w, _ = x.shape
    k1, k2 = jax.random.split(key)
    pad = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    off = jax.random.randint(k1, (n, 2), 0, 7)
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))
    scale = jax.random.uniform(k2, (n, 1, 1, 1), minval=0.8, maxval=1.2)
    return crop(pad, off) * scale


HEADS = ("linear", "cosine")


def _unit(z: jax.Array, axis: int) -> jax.Array:
    return z / jnp.maximum(jnp.linalg.norm(z, axis=axis, keepdims=True), 1e-12)


def _fns(model: Net, cfg: Config):
    temp = cfg.logit_temperature

    def features(p, x):
        return model.apply({"params": p}, x, method=Net.features)

    def apply_fn(p, x):
        if cfg.head == "cosine":  # scale x cos(f, w_c): the head's bias is not used
            return cfg.cosine_scale * (_unit(features(p, x), 1) @ _unit(p["head"]["kernel"], 0))
        return model.apply({"params": p}, x)[0] / temp

    def project(p, f):
        return model.apply({"params": p}, f, method=Net.project)

    def prd_apply(p, x):  # scores against the prototypes <f, w_c> / |w_c| (either head)
        return features(p, x) @ _unit(p["head"]["kernel"], 0)

    return apply_fn, features, project, prd_apply


def imprint(features_fn, *, chunk: int = 256, name: str = "imprint") -> cl.Method:
    """Weight imprinting as a continual method: new classes' head weights = class means.

    At the beginning of each task, the head columns of its classes (``params["head"]
    ["kernel"][:, offset:offset + num_classes]``) become the L2-normalised mean of the
    L2-normalised features ``features_fn(params, x)`` of the task's training images of each
    class, under the parameters the task starts from; the other columns are left as they are.
    With a cosine head this places each new class at its nearest-class-mean prototype.

    Args:
      features_fn: ``features_fn(params, x) -> (n, d)`` features.
      chunk: training images per forward pass.
      name: state key.

    Returns:
      A :class:`cljax.continual.Method` with a ``begin_task`` hook only.
    """
    feats = jax.jit(features_fn)

    def begin_task(state, ctx):
        x, y = ctx.task.split("train")
        z = np.concatenate(
            [np.asarray(feats(state.params, x[s : s + chunk])) for s in range(0, len(x), chunk)]
        ).astype(np.float64)
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        k = ctx.task.num_classes
        if not all((y == c).any() for c in range(k)):
            raise ValueError(f"task {ctx.task.name!r} lacks training images of some class")
        m = np.stack([z[y == c].mean(0) for c in range(k)], axis=1)
        m /= np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-12)
        off = ctx.layout.offsets[ctx.index]
        kernel = state.params["head"]["kernel"]
        kernel = kernel.at[:, off : off + k].set(jnp.asarray(m, kernel.dtype))
        head = {**state.params["head"], "kernel": kernel}
        return state.replace(params={**state.params, "head": head})

    return cl.Method(begin_task=begin_task, name=name)


def _method(name: str, cfg: Config, model: Net, params, features, project) -> cl.Method:
    targets = [(ATTN_OUT, True)]
    if name == "naive":
        return cl.naive()
    if name == "ewc":
        return cl.ewc(weight=cfg.ewc_strength)
    if name == "lwf":
        return cl.lwf(weight=cfg.lwf_weight, temperature=cfg.lwf_temperature)
    if name == "gpm":
        rec = jax.jit(lambda p, x: pj.record_layer_inputs(model, {"params": p}, x))
        # 1-D parameters are not trained here (frozen by the base optimiser) anyway
        return cl.gpm(
            targets, rec, threshold=cfg.gpm_threshold, num_samples=cfg.gpm_samples, freeze_1d=False
        )
    if name == "coso":
        return cl.coso(
            cfg.lr,
            targets,
            threshold=cfg.coso_threshold,
            proj_rank=cfg.coso_proj_rank,
            sketch_rank=cfg.coso_sketch_rank,
        )
    if name == "osft":
        step = 1.0 / cfg.stages
        return cl.osft(targets, ratio=lambda t: pj.rising_ratio(t, start=0.0, step=step))
    if name == "prd":
        groups = np.repeat(np.arange(cfg.stages), cfg.classes_per_stage)
        return cl.prd(
            features,
            project,
            lambda p: p["head"]["kernel"].T,
            augment,
            groups=groups,
            temperature=cfg.prd_temperature,
            proto_weight=cfg.prd_proto_weight,
            distill_weight=cfg.prd_distill_weight,
        )
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def ncm_accuracy(tasks: list[Task], features_fn, params) -> np.ndarray:
    """The nearest-class-mean probe on the frozen encoder: ``A[j, i]`` over seen classes.

    Class means of the L2-normalised train embeddings; a test example goes to the nearest
    (cosine) mean among the classes of stages ``0..max(i, j)``.
    """
    f = jax.jit(features_fn)

    def emb(x):
        z = np.concatenate([np.asarray(f(params, x[s : s + 500])) for s in range(0, len(x), 500)])
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)

    means, offsets = [], []
    for t in tasks:
        z, y = emb(t.x_train), t.y_train
        offsets.append(sum(len(m) for m in means))
        m = np.stack([z[y == c].mean(0) for c in range(t.num_classes)])
        means.append(m / np.linalg.norm(m, axis=1, keepdims=True))
    allm = np.concatenate(means)
    n = len(tasks)
    acc = np.zeros((n, n))
    tests = [emb(t.x_test) for t in tasks]
    for j in range(n):
        for i in range(n):
            k = offsets[max(i, j)] + tasks[max(i, j)].num_classes
            pred = np.argmax(tests[i] @ allm[:k].T, axis=1)
            acc[j, i] = np.mean(pred == tasks[i].y_test + offsets[i])
    return acc


def run_one(cfg: Config, method: str, seed: int, tasks: list[Task]) -> dict:
    pre = clip.load_pretrained()
    n_cls = sum(t.num_classes for t in tasks)
    model = Net(pre.model.config, n_cls)
    init = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
    params = {**init, "encoder": clip.image_encoder_params(pre.params)}
    apply_fn, features, project, prd_apply = _fns(model, cfg)
    t0 = time.perf_counter()
    if method == "ncm":
        acc = ncm_accuracy(tasks, features, params)
        metrics = cl.summarize(acc)
    else:
        is_prd = method == "prd"
        chosen = _method(method, cfg, model, params, features, project)
        # imprinting runs first: the method's begin_task sees the imprinted head
        hooks = [imprint(features), chosen] if cfg.imprint else chosen
        res = cl.run_sequence(
            tasks,
            apply_fn=prd_apply if is_prd else apply_fn,
            params=params,
            optimizer=base_optimizer(cfg),
            steps_per_task=cfg.steps_per_task,
            batch_size=cfg.batch_size,
            methods=hooks,
            scenario="class",
            class_loss="new",
            task_loss=cl.no_task_loss if is_prd else cl.cross_entropy_loss,
            seed=seed,
            progress=lambda it, desc, total: _common.progress(
                it, f"{method}/s{seed} {desc}", total
            ),
        )
        acc, metrics = res.accuracy, res.metrics
    return {
        "method": method,
        "seed": seed,
        "accuracy": np.asarray(acc).tolist(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "seconds": time.perf_counter() - t0,
        "head": cfg.head,
        "imprint": cfg.imprint,
    }


def _is_record(r, method: str, seed: int) -> bool:
    """Whether ``r`` is what :func:`run_one` returns for ``method`` and ``seed``.

    A record with a good checksum can still be another run's (a file copied under the wrong
    name) or another layout's; it is redone rather than tabulated or failing later.
    """
    return (
        isinstance(r, dict)
        and r.get("method") == method
        and r.get("seed") == seed
        and isinstance(r.get("accuracy"), list)
        and isinstance(r.get("metrics"), dict)
        and isinstance(r["metrics"].get("acc"), float)
        and isinstance(r.get("seconds"), int | float)
    )


def summarize_runs(cfg: Config, runs: list[dict], out: Path) -> list[dict]:
    rows, mats = [], {}
    for method in cfg.methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        acc_m, acc_s = _common.mean_std([100 * r["metrics"]["acc"] for r in rs])
        bwt_m, bwt_s = _common.mean_std([100 * r["metrics"].get("bwt", 0.0) for r in rs])
        rows.append(
            {
                "method": method,
                "ACC (%)": f"{acc_m:.1f} ± {acc_s:.1f}",
                "BWT (%)": f"{bwt_m:.1f} ± {bwt_s:.1f}",
                "seeds": len(rs),
                "s/run": f"{np.mean([r['seconds'] for r in rs]):.0f}",
            }
        )
        mats[method] = np.mean([np.asarray(r["accuracy"]) for r in rs], axis=0)
    if mats:
        heatmaps(out / "heatmap_class_incremental.png", "class-incremental", mats)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    cfg = _common.config_from_flags(PRESETS[args.preset], args)
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    if cfg.head not in HEADS:
        raise ValueError(f"--head {cfg.head!r}: choose from {HEADS}")
    if not cfg.cosine_scale > 0:
        raise ValueError(f"--cosine_scale {cfg.cosine_scale!r} must be positive")
    if cfg.imprint and cfg.head != "cosine":
        raise ValueError(f"--imprint true needs --head cosine, not --head {cfg.head}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _common.use_compilation_cache(out / "jax_cache")
    runs = []
    for seed in cfg.seeds:
        tasks = None
        for method in cfg.methods:
            done = out / "runs" / f"{method}-s{seed}.json"
            r = load_json(done)  # None if missing; a damaged record is moved aside, redone
            if r is not None and not _is_record(r, method, seed):
                quarantine_file(done, f"not a run record of {method} seed {seed}")
                r = None
            if r is not None and r.get("head", "linear") != cfg.head:  # older records: linear
                raise ValueError(
                    f"{done} is a run with --head {r.get('head', 'linear')}, not {cfg.head}; "
                    "give each head its own --out"
                )
            if r is not None and bool(r.get("imprint", False)) != cfg.imprint:
                raise ValueError(
                    f"{done} is a run with --imprint {str(r.get('imprint', False)).lower()}, "
                    f"not {str(cfg.imprint).lower()}; give each setting its own --out"
                )
            if r is not None:
                runs.append(r)
                continue
            if cfg.summarize_only:
                continue
            tasks = tasks if tasks is not None else stage_tasks(cfg, seed)
            r = run_one(cfg, method, seed, tasks)
            save_json(done, r)
            runs.append(r)
            print(
                f"{method:6s} seed {seed}: ACC {100 * r['metrics']['acc']:.1f} "
                f"BWT {100 * r['metrics'].get('bwt', 0.0):.1f} ({r['seconds']:.0f} s)",
                flush=True,
            )
    rows = summarize_runs(cfg, runs, out)
    if _common.is_primary():
        print(_common.format_table(rows))
        _common.write_json(
            out / "results.json",
            {"config": dataclasses.asdict(cfg), "table": rows, "runs": runs},
        )
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
