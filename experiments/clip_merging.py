"""The 8-task CLIP merging benchmark: zero-shot heads, task vectors, task arithmetic, TIES, aTLAS.

Real-scale preset of the merging experiment, the protocol of task arithmetic (Ilharco et al.,
ICLR 2023), TIES (Yadav et al., NeurIPS 2023) and aTLAS (Zhang et al., NeurIPS 2024): the
CLIP image encoder
(Hugging Face safetensors) is evaluated on each task with its frozen zero-shot head (the
task's class names and prompt templates through the *pretrained* text tower); fine-tuned
image encoders are loaded (``--finetuned``, one folder per task, e.g. the per-task ViT-B/32
checkpoints that merging benchmarks publish) or fine-tuned here with the recipe of
github.com/mlfoundations/task_vectors ``src/finetune.py`` (AdamW lr 1e-5, weight decay 0.1,
batch 128, the references' cosine schedule with 500 warm-up steps, clip 1.0, head frozen;
``--finetune_steps``, about 2,000 in the papers).
Training batches (fine-tuning, and aTLAS's on the validation splits) go through open_clip's
training transform, a random resized crop of 90-100 % of the area (:func:`train_preprocess`);
evaluation through the eval transform (resize, centre crop). Then task arithmetic (λ from
0, 0.05, ..., 1 on validation), TIES (dis-mean with λ 0.8..2.5 and dis-sum with λ 0..1, on
validation) and aTLAS task addition (block-wise coefficients with q, k and v of each layer
tied as in open_clip, AdamW 1e-3, wd 0.1, 20 epochs over the validation splits, best epoch
by mean normalised validation accuracy).

Command (on a machine with the data; TFDS datasets prepared under ``--data_dir``)::

    python -m experiments.merging --preset clip-vit-b32 --clip_path /ckpt/clip-vit-base-patch32 \\
        --finetuned /ckpt/ft/cars /ckpt/ft/dtd ... --data_dir /data/tfds --out runs/clip-b32

``--finetuned`` folders are taken in the order of ``--tasks`` (default: the 8 datasets of
the benchmark). Runtime on one TPU v4/v5e host: minutes per evaluation pass of the 8 test
sets; aTLAS adds its 20 epochs.

Expected (ViT-B/32, the papers' numbers and the released checkpoints' accuracies in
github.com/fredzzhang/atlas): zero-shot ≈48 % mean absolute accuracy, fine-tuned ≈90 %, task
arithmetic ≈69-70 %, TIES ≈72 %, aTLAS above task arithmetic.

The ``clip-tiny`` preset (``CLJAX_TINY=1`` or ``--preset clip-tiny``) builds a tiny random
CLIP, perturbed "fine-tuned" encoders and mock TFDS data, for tests. The training recipe
(schedule and crops) lives in ``experiments/_clip_recipe.py``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import merging
from cljax.merging import atlas
from cljax.models import clip
from experiments import _common
from experiments._clip_recipe import (  # noqa: F401 (re-exported: other experiments use them)
    TRAIN_CROP_RATIO,
    TRAIN_CROP_SCALE,
    AugmentedTask,
    cosine_lr,
    random_resized_crop_boxes,
    resized_crops,
    train_preprocess,
)

EIGHT_TASKS = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    preset: str = "clip-vit-b32"
    clip_path: str = ""
    finetuned: tuple[str, ...] = ()
    tasks: tuple[str, ...] = EIGHT_TASKS
    data_dir: str = ""
    out: str = "runs/clip-merging"
    eval_batch_size: int = 256
    max_eval_batches: int = 0  # 0 = whole split
    finetune_steps: int = 2000
    finetune_batch_size: int = 128
    finetune_lr: float = 1e-5
    finetune_warmup: int = 500  # task_vectors' --warmup_length
    augment: bool = True  # open_clip's training transform for fine-tuning and aTLAS
    atlas_epochs: int = 20
    atlas_batch_per_task: int = 16
    ties_density: float = 0.2
    seed: int = 0


PRESETS = {
    "clip-vit-b32": ClipConfig(),
    "clip-tiny": ClipConfig(
        preset="clip-tiny",
        tasks=("mnist", "svhn"),
        eval_batch_size=32,
        max_eval_batches=1,
        finetune_steps=2,
        finetune_batch_size=8,
        finetune_warmup=1,
        atlas_epochs=1,
        atlas_batch_per_task=4,
    ),
}


def _tiny_checkpoints(cfg: ClipConfig, workdir: Path) -> tuple[str, list[str], clip.CLIPConfig]:
    rng = np.random.default_rng(cfg.seed)
    config, base = _common.tiny_clip(rng, vision_layers=2)
    clip.save_hf_pretrained(base, config, workdir / "pretrained")
    fts = []
    for t in cfg.tasks:
        ft = dict(
            base,
            vision_model=jax.tree.map(
                lambda x: x + 0.02 * rng.normal(size=x.shape).astype(x.dtype), base["vision_model"]
            ),
        )
        clip.save_hf_pretrained(ft, config, workdir / t)
        fts.append(str(workdir / t))
    return str(workdir / "pretrained"), fts, config


def _toy_tokenize(texts):
    ids = np.zeros((len(texts), 16), np.int32)
    for i, t in enumerate(texts):
        b = [c % 97 + 1 for c in t.encode()][:14]
        ids[i, : len(b)] = b
        ids[i, len(b)] = 98  # end of text: the largest id
    return ids


def _hf_tokenizer(path: str):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(path)
    return lambda texts: tok(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    )["input_ids"]


# ----------------------------------------------------------------------------- run


def run(cfg: ClipConfig) -> dict[str, Any]:
    """Runs the benchmark for ``cfg`` and returns the results (also written to ``cfg.out``)."""
    from cljax.data import TFDSTask

    out = Path(cfg.out)
    tiny = cfg.preset == "clip-tiny"
    tmp = tempfile.TemporaryDirectory() if tiny else None
    if tiny:
        clip_path, finetuned, config = _tiny_checkpoints(cfg, Path(tmp.name))
        tokenize = _toy_tokenize
    else:
        if not cfg.clip_path:
            raise ValueError(
                "--clip_path is required: a Hugging Face CLIP folder (config.json, model.safetensors)"
            )
        clip_path, finetuned = cfg.clip_path, list(cfg.finetuned)
        config = clip.config_from_hf(json.loads((Path(clip_path) / "config.json").read_text()))
        tokenize = _hf_tokenizer(clip_path)
    if finetuned and len(finetuned) != len(cfg.tasks):
        raise ValueError(
            f"--finetuned has {len(finetuned)} folders for {len(cfg.tasks)} tasks {cfg.tasks}"
        )

    model, encoder = clip.CLIP(config), clip.CLIPImageEncoder(config)
    full = clip.load_hf_safetensors(clip_path, model)
    theta0 = clip.load_hf_safetensors(clip_path, encoder)
    size = config.vision.image_size
    tasks = {
        t: TFDSTask(t, data_dir=cfg.data_dir or None, image_size=size, seed=0) for t in cfg.tasks
    }
    # Training batches (fine-tuning, and aTLAS on the validation splits, as the references)
    # go through open_clip's training transform; evaluation through the eval transform.
    train_tasks = {
        t: AugmentedTask(t, data_dir=cfg.data_dir or None, image_size=size)
        if cfg.augment
        else tasks[t]
        for t in cfg.tasks
    }
    scale = 100.0 if tiny else float(np.exp(np.asarray(full["logit_scale"])))
    encode_text = jax.jit(
        lambda ids: model.apply({"params": full}, ids, method=clip.CLIP.encode_text)
    )
    heads = {
        t: clip.zero_shot_head(
            lambda s: encode_text(tokenize(s)),
            task.classes,
            clip.TEMPLATES.get(t, clip.TEMPLATES["generic"]),
            logit_scale=scale,
            cache_dir=out / "heads",
            cache_key=clip_path,
        )
        for t, task in tasks.items()
    }
    features = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
    logits_fns = {
        t: (lambda p, x, h=heads[t]: clip.head_logits(h, encoder.apply({"params": p}, x)))
        for t in cfg.tasks
    }

    def accuracy(params, t, split):
        hits = n = 0
        for i, b in enumerate(tasks[t].eval_batches(cfg.eval_batch_size, split=split)):
            if cfg.max_eval_batches and i == cfg.max_eval_batches:
                break
            pred = jnp.argmax(clip.head_logits(heads[t], features(params, b["x"])), -1)
            hits += int((pred == b["y"]).sum())
            n += len(b["y"])
        return 100.0 * hits / max(n, 1)

    if finetuned:
        fts = [clip.load_hf_safetensors(f, encoder) for f in finetuned]
    else:
        fts = [_finetune(cfg, theta0, logits_fns[t], train_tasks[t]) for t in cfg.tasks]
    tvs = [merging.task_vector(f, theta0) for f in fts]
    ft_val = {t: accuracy(f, t, "val") for t, f in zip(cfg.tasks, fts, strict=True)}
    ft_test = {t: accuracy(f, t, "test") for t, f in zip(cfg.tasks, fts, strict=True)}

    def mean_normalised_val(params):
        return float(
            np.mean([accuracy(params, t, "val") / max(ft_val[t], 1e-9) for t in cfg.tasks])
        )

    merges: dict[str, Any] = {"zero-shot": theta0}
    grid = tuple(float(x) for x in np.round(np.arange(0, 1.0001, 0.05), 2))
    lam, _ = merging.select_scale(
        lambda s: mean_normalised_val(merging.task_arithmetic(theta0, tvs, s)), grid
    )
    merges[f"task arithmetic (λ={lam})"] = merging.task_arithmetic(theta0, tvs, lam)
    ties_grid = tuple(float(x) for x in np.round(np.arange(0.8, 2.51, 0.1), 2))
    for merge, g in (("mean", ties_grid), ("sum", grid)):
        fn = lambda s, m=merge: merging.ties(
            theta0, tvs, density=cfg.ties_density, merge=m, scale=s
        )
        lam_t, _ = merging.select_scale(lambda s, fn=fn: mean_normalised_val(fn(s)), g)
        merges[f"TIES dis-{merge} (λ={lam_t})"] = fn(lam_t)

    spec = atlas_blocks(theta0)
    objective = atlas.task_addition_objective(
        [lambda p, b, f=logits_fns[t]: f(p, b["x"]) for t in cfg.tasks]
    )
    per = cfg.atlas_batch_per_task
    steps = max(1, min(tasks[t].steps_per_epoch(per, "val") for t in cfg.tasks))
    res = atlas.fit(
        objective,
        theta0,
        tvs,
        lambda s: [train_tasks[t].batch_at(s, per, seed=cfg.seed, split="val") for t in cfg.tasks],
        epochs=cfg.atlas_epochs,
        steps_per_epoch=steps,
        spec=spec,
        evaluate=lambda p: {"normalised": mean_normalised_val(p)},
        score="normalised",
    )
    merges["aTLAS"] = atlas.compose(theta0, tvs, res.coefficients, spec)

    rows = []
    for name, params in {**merges, "fine-tuned (each its own)": None}.items():
        accs = ft_test if params is None else {t: accuracy(params, t, "test") for t in cfg.tasks}
        row = {
            "method": name,
            **{t: accs[t] for t in cfg.tasks},
            "mean": float(np.mean(list(accs.values()))),
        }
        row["normalised"] = float(
            np.mean([100 * accs[t] / max(ft_test[t], 1e-9) for t in cfg.tasks])
        )
        rows.append(row)
    table = _common.format_table(rows)
    print(table)
    results = {"config": dataclasses.asdict(cfg), "rows": rows, "atlas_best_epoch": res.best_epoch}
    if _common.is_primary():
        _common.write_json(out / "results.json", results)
    if tmp is not None:
        tmp.cleanup()
    return results


def atlas_blocks(theta0) -> atlas.Blocks:
    """aTLAS blocks as the reference's open_clip encoder has them: one per tensor, with the q,
    k and v kernels of each attention layer one block and their biases another (open_clip's
    packed ``in_proj_weight`` and ``in_proj_bias``)."""
    return atlas.blocks(theta0, groups=atlas.CLIP_QKV_GROUPS)


def _finetune(cfg: ClipConfig, theta0, logits_fn, task):
    """task_vectors' fine-tuning recipe (``src/finetune.py``): AdamW, the references' cosine
    schedule with ``cfg.finetune_warmup`` warm-up steps (500, task_vectors' default), clip 1.0,
    frozen zero-shot head."""
    sched = cosine_lr(cfg.finetune_lr, cfg.finetune_warmup, cfg.finetune_steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.1))

    def loss(p, b):
        lg = logits_fn(p, b["x"])
        return optax.softmax_cross_entropy_with_integer_labels(lg, b["y"]).mean()

    @jax.jit
    def step(p, o, b):
        g = jax.grad(loss)(p, b)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    params, opt = theta0, tx.init(theta0)
    for s in range(cfg.finetune_steps):
        params, opt = step(params, opt, task.batch_at(s, cfg.finetune_batch_size, seed=cfg.seed))
    return params


def main(preset: str, args) -> dict[str, Any]:
    """Entry point from ``experiments.merging`` for ``--preset clip-*``."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    changes = {}
    for f in dataclasses.fields(ClipConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "preset":
            changes[f.name] = tuple(v) if isinstance(getattr(cfg, f.name), tuple) else v
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.preset == "clip-tiny":
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=64):
            return run(cfg)
    return run(cfg)


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.clip_merging [--preset clip-vit-b32|clip-tiny] [flags]``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    _common.add_config_flags(parser, ClipConfig)
    args = parser.parse_args(argv)
    return main(args.preset or ClipConfig.preset, args)


if __name__ == "__main__":
    cli()
