"""Can MiniCLIP's image tower learn glyph identity? A supervised diagnostic of the foundation.

The embedded benchmark's glyph tasks (``letters``, ``greek``) stay near chance after
fine-tuning the shipped MiniCLIP. This diagnostic separates the two possible causes: the
contrastive objective (captions that can be matched by colour, position and background
without reading the glyph) or the image tower itself (a patch-8 ViT at 32×32, which has no
translation prior, at the step counts a CPU affords).

It trains MiniCLIP's image tower (``CLIPImageEncoder`` with the shipped config) *supervised*
on the identity of single-object corpus scenes (:data:`cljax.data.CONCEPTS`: digits, Latin
and Greek letters, shapes; 70 classes), from the shipped weights (``--init pretrained``) or
from a random initialisation (``--init scratch``), with AdamW, warm-up then cosine. It
reports the accuracy on held-out corpus scenes (another corpus seed) and, after training, a
logistic-regression probe (C = 10) of the tower's features on benchmark tasks. Direct
supervision is the most the tower can get from the corpus: if it learns glyph identity
slowly under it, no contrastive recipe of the same budget will do better.

Command::

    python -m experiments.glyph_probe                           # from the shipped tower
    python -m experiments.glyph_probe --init scratch --lr 1e-3  # from a random tower
    python -m experiments.glyph_probe --preset tiny      # smoke test
    python -m experiments.glyph_probe --init scratch --scenes legible --steps 300 \
        --batch_size 128 --lr 1e-3 --tower vit           # or --tower cnn

``--scenes legible`` replaces the corpus scenes by large, centred glyphs on a plain background
(the 60 glyph classes of the corpus, its fonts): if the tower learns these slowly too, the
corpus' small glyphs and clutter are not what holds it back. ``--tower cnn`` swaps the ViT for
a two-layer convolutional net of the same role (a diagnostic reference only: it is not a CLIP
tower and loads no weights).

The measured figures are in ``docs/results/merging.md``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import optax
from flax import linen as nn

from cljax.data import CONCEPTS, corpus_batch, embedded_benchmark
from cljax.data import _render as R
from cljax.models import clip
from experiments import _common as C


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    out: str = "runs/glyph_probe"
    init: str = "pretrained"  # "pretrained" (the shipped tower) or "scratch"
    scenes: str = "corpus"  # "corpus" (single-object scenes), "legible" (large centred glyphs)
    # or "mnist" (the benchmark's real digits: a sanity check of the tower)
    tower: str = "vit"  # "vit" (MiniCLIP's image tower) or "cnn" (a reference, scratch only)
    train_corpus: int = 40_000  # corpus examples drawn for training (single objects kept)
    test_corpus: int = 3_000  # held-out corpus examples (another seed; single objects kept)
    steps: int = 600
    batch_size: int = 256
    lr: float = 3e-4  # 1e-3 for --init scratch
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_every: int = 100
    probe_tasks: tuple[str, ...] = ("letters", "greek", "mnist", "svhn")
    probe_train: int = 1000  # benchmark training images for the logistic-regression probe
    probe_test: int = 500
    seed: int = 0


PRESETS = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        out="runs/glyph_probe-tiny",
        train_corpus=200,
        test_corpus=100,
        steps=4,
        batch_size=16,
        warmup_steps=1,
        eval_every=2,
        probe_tasks=("mnist",),
        probe_train=60,
        probe_test=40,
    ),
}
HELP = {
    "init": "start from the shipped image tower ('pretrained') or a random one ('scratch')",
    "scenes": "train on the corpus' single-object scenes ('corpus'), on large, centred "
    "glyphs on a plain background ('legible') or on the benchmark's real digits ('mnist')",
    "tower": "MiniCLIP's ViT image tower ('vit') or a small convolutional net ('cnn', with "
    "--init scratch)",
    "probe_tasks": "benchmark tasks probed with logistic regression on the tower's features",
}
_TRAIN_SEED, _TEST_SEED = 123, 456  # corpus seeds other than the pretraining run's (0)


class _Classifier(nn.Module):
    config: clip.CLIPConfig
    num_classes: int

    @nn.compact
    def __call__(self, x):
        f = clip.CLIPImageEncoder(self.config, name="enc")(x)
        return nn.Dense(self.num_classes, name="head")(f), f


class _ConvNet(nn.Module):
    """Two 3x3 convolutions with max-pooling and a linear head: the locality prior a ViT lacks."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        for features in (32, 64):
            x = nn.max_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), (2, 2))
        f = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="head")(f), f


def _single_objects(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    images, _, concepts = corpus_batch(seed, 0, count)
    keep = concepts >= 0  # scenes of one glyph or shape (not textures, counts, capitals)
    return images[keep], concepts[keep]


_GLYPHS = tuple(i for i, c in enumerate(CONCEPTS) if c.startswith(("digit ", "letter ", "greek ")))


def _legible_glyphs(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` large glyphs (em height 22-30 of 32 px, centred within 2 px, tilted at most 10
    degrees) in the corpus' fonts, one plain colour on another, with light noise; labels index
    :data:`cljax.data.CONCEPTS` (digits, Latin and Greek letters)."""
    rng = np.random.default_rng([seed, 1])
    greek = dict((name, char) for char, name in R.GREEK)
    colours = tuple(R.COLOURS)
    images = np.zeros((count, 32, 32, 3), np.uint8)
    labels = np.zeros((count,), np.int32)
    for i in range(count):
        concept = _GLYPHS[rng.integers(len(_GLYPHS))]
        kind, name = CONCEPTS[concept].rsplit(" ", 1)
        char = greek[name] if kind == "greek letter" else name
        fonts = [f for f in R.PRETRAIN_FONTS if kind != "greek letter" or f not in R.LATIN_ONLY]
        mask = R.glyph_mask(
            char,
            fonts[rng.integers(len(fonts))],
            size=32,
            height=rng.uniform(22, 30),
            centre=(16 + rng.uniform(-2, 2), 16 + rng.uniform(-2, 2)),
            angle=rng.uniform(-10, 10),
        )
        fg, bg = rng.choice(len(colours), 2, replace=False)
        back = np.broadcast_to(R.colour(colours[bg], rng), (32, 32, 3)).astype(np.float32)
        image = R.composite(back, mask, R.colour(colours[fg], rng))
        images[i] = R.to_uint8(image + rng.normal(0.0, 4.0, image.shape))
        labels[i] = concept
    return images, labels


def _mnist_digits(train: int, test: int) -> tuple[np.ndarray, ...]:
    """The benchmark's ``mnist`` task: ``train`` and ``test`` real digits (or as many as its
    splits of MNIST-5k hold), labels 0-9."""
    task = embedded_benchmark(
        tasks=("mnist",), train_size=train, val_size=10, test_size=test
    ).tasks[0]
    return task.x_train, task.y_train, task.x_test, task.y_test


def run(cfg: Config) -> dict:
    if cfg.init not in ("pretrained", "scratch"):
        raise ValueError(f"init={cfg.init!r} must be 'pretrained' or 'scratch'")
    if cfg.scenes not in ("corpus", "legible", "mnist"):
        raise ValueError(f"scenes={cfg.scenes!r} must be 'corpus', 'legible' or 'mnist'")
    if cfg.tower not in ("vit", "cnn"):
        raise ValueError(f"tower={cfg.tower!r} must be 'vit' or 'cnn'")
    if cfg.tower == "cnn" and cfg.init != "scratch":
        raise ValueError(
            f"tower='cnn' has no pretrained weights: pass init='scratch', not {cfg.init!r}"
        )
    pre = clip.load_pretrained()
    if cfg.tower == "vit":
        net = _Classifier(pre.model.config, len(CONCEPTS))
    else:
        net = _ConvNet(len(CONCEPTS))
    if cfg.scenes == "mnist":
        x_train, y_train, x_test, y_test = _mnist_digits(cfg.train_corpus, cfg.test_corpus)
    else:
        draw = _single_objects if cfg.scenes == "corpus" else _legible_glyphs
        x_train, y_train = draw(_TRAIN_SEED, cfg.train_corpus)
        x_test, y_test = draw(_TEST_SEED, cfg.test_corpus)

    def norm(x):
        return clip.normalize_images(x, pre.mean, pre.std)

    key = jax.random.key(cfg.seed)
    params = dict(net.init(key, norm(x_train[:1]))["params"])
    if cfg.init == "pretrained":
        params["enc"] = clip.image_encoder_params(pre.params)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay)
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = net.apply({"params": p}, norm(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def forward(params, x):
        logits, features = net.apply({"params": params}, norm(x))
        return logits.argmax(-1), features

    def batched(params, x, i):
        return np.concatenate(
            [np.asarray(forward(params, x[s : s + 500])[i]) for s in range(0, len(x), 500)]
        )

    def corpus_accuracy(params) -> float:
        return 100.0 * float(np.mean(batched(params, x_test, 0) == y_test))

    rng = np.random.default_rng(cfg.seed)
    curve = [{"step": 0, "loss": None, "heldout": corpus_accuracy(params)}]
    for s in C.progress(range(cfg.steps), "glyph probe"):
        idx = rng.integers(0, len(x_train), cfg.batch_size)
        params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
            curve.append({"step": s + 1, "loss": float(loss), "heldout": corpus_accuracy(params)})

    from sklearn.linear_model import LogisticRegression

    bench = embedded_benchmark(
        tasks=tuple(cfg.probe_tasks),
        train_size=cfg.probe_train,
        val_size=10,
        test_size=cfg.probe_test,
    )
    probe = {}
    for t in bench.tasks:
        clf = LogisticRegression(C=10.0, max_iter=2000)
        clf.fit(batched(params, t.x_train, 1), t.y_train)
        probe[t.name] = 100.0 * float(clf.score(batched(params, t.x_test, 1), t.y_test))
    return {
        "config": dataclasses.asdict(cfg),
        "classes": len(CONCEPTS),
        "train_images": len(x_train),
        "test_images": len(x_test),
        "curve": curve,
        "probe": probe,
    }


def main(argv=None) -> dict:
    cfg, results = C.run_from_flags(
        run, Config, PRESETS, argv, description=__doc__.split("\n")[0], help=HELP
    )
    if C.is_primary():
        C.write_json(Path(cfg.out) / "results.json", results)
        rows = [
            {"step": r["step"], f"held-out {cfg.scenes} (%)": r["heldout"]}
            for r in results["curve"]
        ]
        print(C.format_table(rows))
        print(C.format_table([{"init": cfg.init, **results["probe"]}]))
        print(f"wall {results['seconds']:.0f} s, CPU {results['cpu_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
