"""Weak-to-strong logit fusion: a fine-tuned small model steers the untuned MiniCLIP.

The setting of "On Giant's Shoulders" (Fan et al., NeurIPS 2024) on the embedded foundation:
a *large* model (the shipped MiniCLIP, :func:`cljax.models.clip.load_pretrained`, zero-shot
on a benchmark task through its text head) and a *small* model of the same output space are
available; only the small one is fine-tuned on the task. The large model's logits are then
moved by the small model's fine-tuning shift, ``large + alpha * (small_ft - small)``, with a
static ``alpha`` (:func:`cljax.losses.logit_arithmetic`) or one chosen per example by
:func:`cljax.losses.dynamic_logit_fusion`. Reported: test accuracy of every model and the
fraction of the large model's fine-tuning gap that the fusion recovers,
``(acc(fused) - acc(large)) / (acc(large_ft) - acc(large))``.

The models, and why:

- **large**: MiniCLIP's image tower and its zero-shot head (class names in the task's
  prompt templates through the text tower; the logit scale of the checkpoint).
- **large_ft**: the fine-tuning ceiling. Full fine-tuning of MiniCLIP is the paper's
  comparison, but it costs minutes of CPU per seed; here the large model's *head* is
  fine-tuned on its frozen features (a linear probe started from the zero-shot head), a
  cheaper and usually weaker ceiling. The fraction recovered is measured against it.
- **small**: MiniCLIP has no smaller sibling, so one is made here quickly: an MLP on pixels
  (``3072-hidden-hidden-D``) distilled from MiniCLIP's image embeddings (cosine loss) on
  images of the *control* task, which is drawn from MiniCLIP's pretraining distribution, not
  from the target task. It shares MiniCLIP's text head, hence the output space, and is a much
  weaker zero-shot model: the weak pretrained model of the paper's setting.
- **small_ft**: the small model fine-tuned on the task's training set (cross-entropy through
  the frozen zero-shot head, as CLIP fine-tuning is usually done).

``alpha`` static: 1 (proxy tuning's choice) and the grid value best on the validation set.
The seeds vmap the small model's distillation and fine-tuning and the head probe.

Command::

    python -m experiments.logit_fusion                 # the default preset (signs, 3 seeds)
    python -m experiments.logit_fusion --preset tiny   # smoke test

Expected result: ``docs/results/logit-fusion.md`` (the measured table and what it means).

Outputs under ``--out`` (default ``runs/logit-fusion``): ``results.json`` and a printed table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import losses
from cljax.data import embedded_benchmark
from cljax.models import clip
from experiments import _common as C

GRID = tuple(float(a) for a in np.round(np.linspace(0.0, 2.0, 21), 2))


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    task: str = "signs"
    seeds: tuple[int, ...] = (0, 1, 2)
    train_size: int = 1000  # task training set and control (distillation) set alike
    val_size: int = 200
    test_size: int = 400
    hidden: int = 512
    distill_steps: int = 1500
    finetune_steps: int = 500
    probe_steps: int = 500
    batch_size: int = 64
    learning_rate: float = 1e-3
    data_seed: int = 0
    out: str = "runs/logit-fusion"


PRESETS = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        seeds=(0,),
        train_size=200,
        val_size=50,
        test_size=100,
        hidden=64,
        distill_steps=200,
        finetune_steps=300,
        probe_steps=100,
        out="runs/logit-fusion-tiny",
    ),
}

HELP = {
    "preset": f"embedded preset to start from: {', '.join(PRESETS)}",
    "task": "the benchmark task the small model is fine-tuned on",
    "seeds": "seeds of the small model, its fine-tuning and the head probe",
    "train_size": "training examples of the task, and control images for the distillation",
    "val_size": "validation examples (choose the static alpha)",
    "test_size": "test examples",
    "hidden": "width of the small MLP's two hidden layers",
    "distill_steps": "Adam steps distilling MiniCLIP's image embeddings into the small model",
    "finetune_steps": "Adam steps fine-tuning the small model on the task",
    "probe_steps": "Adam steps fine-tuning the large model's head (the ceiling)",
    "batch_size": "examples per step",
    "learning_rate": "Adam learning rate",
    "data_seed": "seed of the benchmark's images and splits",
    "out": "output folder for results.json",
}


def _clip_features(pre, images: np.ndarray, chunk: int = 200) -> jax.Array:
    """MiniCLIP image embeddings (unnormalised), in fixed-size chunks (one compilation)."""
    enc = pre.image_encoder()
    params = clip.image_encoder_params(pre.params)
    f = jax.jit(lambda p, x: enc.apply({"params": p}, clip.normalize_images(x, pre.mean, pre.std)))
    out = []
    for s in range(0, len(images), chunk):
        x = images[s : s + chunk]
        n = len(x)
        x = np.concatenate([x, np.repeat(x[:1], chunk - n, 0)]) if n < chunk else x
        out.append(f(params, jnp.asarray(x))[:n])
    return jnp.concatenate(out)


def _mlp_init(key, dims):
    keys = jax.random.split(key, len(dims) - 1)
    return [
        {"w": jnp.sqrt(2.0 / a) * jax.random.normal(k, (a, b)), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
    ]


def _mlp(p, x):
    for layer in p[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ p[-1]["w"] + p[-1]["b"]


def _fit(loss_fn, steps: int, lr: float, batch_size: int, n: int):
    """``fit(params, key, *data) -> params``: Adam on random batches of ``n`` rows, one scan."""
    tx = optax.adam(lr)

    def fit(p, key, *data):
        def step(carry, k):
            p, opt = carry
            i = jax.random.randint(k, (batch_size,), 0, n)
            g = jax.grad(loss_fn)(p, *(d[i] for d in data))
            upd, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, upd), opt), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), jax.random.split(key, steps))
        return p

    return fit


def _acc(logits, y) -> np.ndarray:
    return 100.0 * np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y), axis=-1)


def run(cfg: Config) -> dict:
    bench = embedded_benchmark(
        cfg.data_seed,
        tasks=(cfg.task,),
        train_size=cfg.train_size,
        val_size=cfg.val_size,
        test_size=cfg.test_size,
    )
    task, control = bench.tasks[0], bench.control
    pre = clip.load_pretrained()
    head = clip.zero_shot_head(
        pre.encode_text, task.classes, bench.templates[cfg.task], logit_scale=pre.logit_scale
    )
    pix = lambda x: jnp.asarray(np.asarray(x, np.float32).reshape(len(x), -1) / 255.0)  # noqa: E731
    splits = {
        "train": (task.x_train, task.y_train),
        "val": (task.x_val, task.y_val),
        "test": (task.x_test, task.y_test),
    }
    feats = {k: _clip_features(pre, x) for k, (x, _) in splits.items()}
    ys = {k: jnp.asarray(y.astype(np.int32)) for k, (_, y) in splits.items()}
    xs = {k: pix(x) for k, (x, _) in splits.items()}
    teacher = _clip_features(pre, control.x_train)
    teacher = teacher / jnp.linalg.norm(teacher, axis=-1, keepdims=True)
    x_control = pix(control.x_train)
    seeds = list(cfg.seeds)
    key = lambda s, i: jax.random.fold_in(jax.random.key(s), i)  # noqa: E731
    keys = lambda i: jnp.stack([key(s, i) for s in seeds])  # noqa: E731

    # the large model: zero-shot, and its head fine-tuned on frozen features (the ceiling)
    large = {k: clip.head_logits(head, f) for k, f in feats.items()}

    def probe_loss(h, f, y):
        return optax.softmax_cross_entropy_with_integer_labels(clip.head_logits(h, f), y).mean()

    n_train = len(task.y_train)
    probe = _fit(probe_loss, cfg.probe_steps, cfg.learning_rate, cfg.batch_size, n_train)
    heads = jax.jit(jax.vmap(probe, in_axes=(None, 0, None, None)))(
        head, keys(1), feats["train"], ys["train"]
    )
    large_ft = {
        k: jax.vmap(clip.head_logits, in_axes=(0, None))(heads, f) for k, f in feats.items()
    }

    # the small model: distilled from MiniCLIP's image embeddings on control images
    dims = (x_control.shape[1], cfg.hidden, cfg.hidden, teacher.shape[1])

    def distill_loss(p, x, t):
        z = _mlp(p, x)
        return jnp.mean(1.0 - jnp.sum(z * t, -1) / jnp.linalg.norm(z, axis=-1))

    distill = _fit(
        distill_loss, cfg.distill_steps, cfg.learning_rate, cfg.batch_size, len(x_control)
    )
    init = jax.tree.map(lambda *a: jnp.stack(a), *[_mlp_init(key(s, 0), dims) for s in seeds])
    small_p = jax.jit(jax.vmap(distill, in_axes=(0, 0, None, None)))(
        init, keys(2), x_control, teacher
    )

    def ft_loss(p, x, y):
        z = clip.head_logits(head, _mlp(p, x))
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    finetune = _fit(ft_loss, cfg.finetune_steps, cfg.learning_rate, cfg.batch_size, n_train)
    small_ft_p = jax.jit(jax.vmap(finetune, in_axes=(0, 0, None, None)))(
        small_p, keys(3), xs["train"], ys["train"]
    )
    apply = jax.jit(jax.vmap(lambda p, x: clip.head_logits(head, _mlp(p, x)), in_axes=(0, None)))
    small = {k: apply(small_p, x) for k, x in xs.items()}
    small_ft = {k: apply(small_ft_p, x) for k, x in xs.items()}

    # fusion: static alpha (1 and the best on val) and DLF, per seed
    fuse = jax.jit(jax.vmap(losses.logit_arithmetic, in_axes=(None, 0, 0, None)))
    dlf = jax.jit(jax.vmap(lambda b, e: losses.dynamic_logit_fusion(large["test"], b, e[None])))
    val_acc = np.stack(
        [
            _acc(fuse(large["val"], small["val"], small_ft["val"][:, None], a), ys["val"])
            for a in GRID
        ],
        axis=1,
    )  # [seeds, grid]
    best = np.asarray(GRID)[np.argmax(val_acc, axis=1)]
    fused_best = jnp.stack(
        [
            losses.logit_arithmetic(
                large["test"], small["test"][i], small_ft["test"][i][None], best[i]
            )
            for i in range(len(seeds))
        ]
    )
    fused_dlf, alpha_dlf = dlf(small["test"], small_ft["test"])
    y = ys["test"]
    acc = {
        "large (MiniCLIP zero-shot)": np.full(len(seeds), _acc(large["test"], y)),
        "large_ft (head fine-tuned, ceiling)": _acc(large_ft["test"], y),
        "small (distilled, zero-shot)": _acc(small["test"], y),
        "small_ft": _acc(small_ft["test"], y),
        "fused, alpha = 1": _acc(
            fuse(large["test"], small["test"], small_ft["test"][:, None], 1.0), y
        ),
        "fused, alpha best on val": _acc(fused_best, y),
        "fused, DLF": _acc(fused_dlf, y),
    }
    gap = acc["large_ft (head fine-tuned, ceiling)"] - acc["large (MiniCLIP zero-shot)"]
    rows = []
    for name, a in acc.items():
        mu, sd = C.mean_std(a.tolist())
        row = {"model": name, "test acc (%)": f"{mu:.1f} ± {sd:.1f}", "_acc": mu}
        if name.startswith("fused"):
            rec = (a - acc["large (MiniCLIP zero-shot)"]) / gap
            m2, s2 = C.mean_std(rec.tolist())
            row["gap recovered"] = f"{m2:.2f} ± {s2:.2f}"
            row["_recovered"] = m2
        else:
            row["gap recovered"] = ""
        rows.append(row)
    alpha = np.asarray(alpha_dlf)[:, 0]  # [seeds, test]
    return {
        "config": dataclasses.asdict(cfg),
        "per_seed": {k: v.tolist() for k, v in acc.items()},
        "alpha_best_on_val": best.tolist(),
        "dlf_alpha": {
            "mean": float(alpha.mean()),
            "quantiles_10_50_90": np.quantile(alpha, [0.1, 0.5, 0.9]).tolist(),
        },
        "rows": rows,
    }


def main(argv=None) -> dict:
    cfg, results = C.run_from_flags(
        run, Config, PRESETS, argv, description=__doc__.split("\n")[0], help=HELP
    )
    if C.is_primary():
        cols = [c for c in results["rows"][0] if not c.startswith("_")]
        print(
            f"\n### Task {cfg.task}: test accuracy, mean ± std over seeds {list(cfg.seeds)}; "
            f"alpha best on val {results['alpha_best_on_val']}, DLF alpha mean "
            f"{results['dlf_alpha']['mean']:.2f}\n"
        )
        print(C.format_table(results["rows"], cols))
        C.write_json(Path(cfg.out) / "results.json", results)
        print(f"\n{results['seconds']:.0f} s ({results['cpu_seconds']:.0f} s CPU); in {cfg.out}")
    return results


if __name__ == "__main__":
    main()
