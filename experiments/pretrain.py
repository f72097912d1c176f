"""Pretrains MiniCLIP, the embedded foundation model, on the procedural image–text corpus.

A CLIP built by :mod:`cljax.models.clip` (the same code as the ViT-B/32 presets, a small
config: 32×32 RGB images, patch 8, a 4-layer 192-wide image tower, a 3-layer 128-wide text
tower, 128-d embeddings) is trained contrastively on image–caption pairs of
:func:`cljax.data.corpus_batch`. The loss is CLIP's symmetric InfoNCE with a learnable
temperature, with one change for a corpus whose captions repeat: pairs with identical
captions are all positives (the target distribution of a row is uniform over them), since
plain InfoNCE would push an image away from its own caption's duplicates. The tokenizer is a
CLIP byte-level BPE trained on the corpus' captions.

Command::

    python -m experiments.pretrain                  # the shipped model's settings
    python -m experiments.pretrain --preset tiny    # a smoke test (seconds)
    python -m experiments.pretrain --export cljax/models/embedded/miniclip   # refresh the package copy

The run is resumable (checkpoints under ``<out>/ckpt``; the generated corpus is cached under
``<out>``). At the end it writes a complete Hugging Face CLIP folder under ``<out>/miniclip``
(``config.json``, ``model.safetensors``, tokenizer files, ``preprocessor_config.json``, a
model card) and, with ``--export``, copies it there too. The command's wall time on the
2-core development machine and the loss curve are in the model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.checkpoint import CheckpointManager
from cljax.data import corpus_batch
from cljax.models import clip
from cljax.train import TrainState, make_step
from experiments import _common

__all__ = ["PRESETS", "Config", "main", "run"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of MiniCLIP's pretraining (the default is the shipped model's)."""

    preset: str = "default"
    out: str = "runs/pretrain"
    export: str = ""  # also copy the finished Hugging Face folder here
    seed: int = 0
    corpus_size: int = 160_000  # distinct image-caption pairs, cycled in epochs
    tokenizer_captions: int = 20_000  # captions the BPE is trained on
    max_merges: int = 4000
    context_length: int = 24
    # Image tower.
    image_size: int = 32
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    # Text tower.
    text_width: int = 128
    text_depth: int = 3
    text_heads: int = 2
    projection_dim: int = 128
    # Optimisation (AdamW, linear warm-up then cosine; as CLIP, scaled down).
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    clip_norm: float = 1.0
    save_every: int = 250
    log_every: int = 25
    workers: int = 2  # processes that render the corpus


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        out="runs/pretrain-tiny",
        corpus_size=512,
        tokenizer_captions=512,
        width=32,
        depth=1,
        heads=1,
        text_width=32,
        text_depth=1,
        text_heads=1,
        projection_dim=16,
        steps=6,
        batch_size=32,
        warmup_steps=2,
        save_every=4,
        log_every=2,
        workers=1,
    ),
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def model_config(cfg: Config, vocab_size: int, eos_token_id: int) -> clip.CLIPConfig:
    """The MiniCLIP architecture of a config (ViT-style towers of Hugging Face's layout)."""
    return clip.CLIPConfig(
        vision=clip.CLIPVisionConfig(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.width,
            intermediate_size=4 * cfg.width,
            num_layers=cfg.depth,
            num_heads=cfg.heads,
        ),
        text=clip.CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=cfg.context_length,
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_layers=cfg.text_depth,
            num_heads=cfg.text_heads,
            eos_token_id=eos_token_id,
        ),
        projection_dim=cfg.projection_dim,
    )


def _render_chunk(args):
    seed, start, count = args
    images, captions, _ = corpus_batch(seed, start, count)
    return images, captions


def load_corpus(cfg: Config, out: Path, log=print) -> tuple[np.ndarray, list[str]]:
    """The first ``corpus_size`` corpus pairs, rendered once and cached under ``out``."""
    path = out / f"corpus-{cfg.seed}-{cfg.corpus_size}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return f["images"], [str(c) for c in f["captions"]]
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            zipfile.BadZipFile,
        ) as e:  # a damaged cache: render again
            log(f"corpus cache {path} is unreadable ({e}); rendering it again")
    chunk = 2000
    jobs = [
        (cfg.seed, s, min(chunk, cfg.corpus_size - s)) for s in range(0, cfg.corpus_size, chunk)
    ]
    t0 = time.perf_counter()
    if cfg.workers > 1:
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            parts = list(_common.progress(pool.imap(_render_chunk, jobs), "corpus", len(jobs)))
    else:
        parts = [_render_chunk(j) for j in _common.progress(jobs, "corpus")]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    log(f"rendered {len(captions)} corpus pairs in {time.perf_counter() - t0:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.npz")
    np.savez(tmp, images=images, captions=np.asarray(captions))
    os.replace(tmp, path)
    return images, captions


def normalize(images_uint8: np.ndarray | jax.Array) -> jax.Array:
    """uint8 ``[N, H, W, 3]`` -> CLIP-normalised float32 (as ``CLIPImageProcessor``)."""
    return clip.normalize_images(images_uint8, CLIP_MEAN, CLIP_STD)


def contrastive_loss(model: clip.CLIP, params, batch) -> tuple[jax.Array, dict]:
    """CLIP's symmetric InfoNCE; pairs with the same caption id are all positives."""
    logits, _, _ = model.apply({"params": params}, normalize(batch["images"]), batch["ids"])
    same = (batch["caption_id"][:, None] == batch["caption_id"][None, :]).astype(jnp.float32)
    targets = same / same.sum(axis=1, keepdims=True)
    loss_i = optax.softmax_cross_entropy(logits, targets).mean()
    loss_t = optax.softmax_cross_entropy(logits.T, targets.T).mean()
    acc = jnp.mean(same[jnp.arange(len(same)), jnp.argmax(logits, axis=1)])
    return (loss_i + loss_t) / 2, {"accuracy": acc}


def _clamp_scale(state: TrainState) -> TrainState:
    # CLIP clips the learned temperature so that exp(logit_scale) <= 100.
    p = dict(state.params)
    p["logit_scale"] = jnp.clip(p["logit_scale"], 0.0, jnp.log(100.0))
    return state.replace(params=p)


def _hash(cfg: Config) -> str:
    skip = {"preset", "out", "export", "save_every", "log_every", "workers"}
    blob = json.dumps(
        {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def set_special_token_ids(path: Path, tokenizer: clip.CLIPTokenizer) -> None:
    """Writes the tokenizer's start, end and padding ids into ``config.json``'s text config.

    Hugging Face's ``CLIPTextConfig`` defaults to the ids of CLIP's 49,408-token vocabulary;
    this tokenizer has its own (and pads with the end token, as CLIP does).
    """
    cfg = json.loads(path.read_text())
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    cfg["text_config"].update(ids, pad_token_id=tokenizer.eos_id)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_preprocessor_config(directory: Path, image_size: int) -> None:
    """``preprocessor_config.json`` for ``CLIPImageProcessor`` (resize, crop, rescale, normalise)."""
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_model_card(directory: Path, summary: dict) -> None:
    """``README.md`` (what the model is, data, compute, loss curve) and ``loss.png``."""
    cfg, t = summary["config"], summary["time"]
    hist = summary["history"]
    every = max(1, len(hist) // 10)
    rows = [h for i, h in enumerate(hist) if i % every == 0 or i == len(hist) - 1]
    curve = "\n".join(
        f"| {h['step']} | {h['loss']:.3f} | {100 * h['accuracy']:.1f} | {h['logit_scale']:.1f} |"
        for h in rows
    )
    card = f"""---
license: apache-2.0
tags: [clip, test-bed, cljax]
---
# MiniCLIP: cljax's embedded foundation model

A **test bed, not a real CLIP.** A {summary["parameters"] / 1e6:.2f}M-parameter CLIP (Hugging Face
`CLIPModel` layout) pretrained contrastively on cljax's procedural image-caption corpus, so that
the methods of model merging, multi-task and continual learning, which all adapt a *pretrained*
model, can be tried on a laptop in minutes. It knows rendered glyphs (digits, Latin and Greek
letters), ten geometric shapes, eight two-tone textures, twelve colour names, positions, sizes
and small counts, and nothing else.

- **Architecture**: image tower ViT, {cfg["image_size"]}x{cfg["image_size"]} RGB, patch \
{cfg["patch_size"]}, width {cfg["width"]}, depth {cfg["depth"]}, {cfg["heads"]} heads; text \
tower width {cfg["text_width"]}, depth {cfg["text_depth"]}, {cfg["context_length"]} tokens; \
{cfg["projection_dim"]}-d embeddings; QuickGELU, pre-LayerNorm, as OpenAI CLIP.
- **Tokenizer**: CLIP's byte-level BPE, {summary["vocab_size"]} tokens, trained on \
{cfg["tokenizer_captions"]:,} corpus captions.
- **Data**: {cfg["corpus_size"]:,} image-caption pairs of `cljax.data.corpus_batch(seed={cfg["seed"]})`
  ({summary["distinct_captions"]:,} distinct captions): glyphs in 9 of matplotlib's bundled fonts,
  shapes, textures and counts with colour, position, size, rotation, backgrounds and noise. No
  image of a real data set. The embedded benchmark's procedural tasks use other fonts and styles.
- **Training**: {cfg["steps"]} steps of batch {cfg["batch_size"]} ({cfg["steps"] * cfg["batch_size"] / cfg["corpus_size"]:.1f} \
epochs), AdamW (lr {cfg["lr"]}, weight decay {cfg["weight_decay"]}), {cfg["warmup_steps"]} warm-up \
steps then cosine, gradient clipping {cfg["clip_norm"]}; symmetric InfoNCE with a learned \
temperature (exp capped at 100), every pair with an identical caption counted as a positive.
- **Compute**: {t["wall_s"] / 60:.0f} min wall ({t["train_wall_s"] / 60:.0f} min of training) and \
{t["cpu_s"] / 60:.0f} min of CPU time on {", ".join(summary["devices"])}, a 2-core machine shared \
with other jobs; `python -m experiments.pretrain` reproduces it.
- **Use**: `cljax.models.clip.load_pretrained()`; `transformers.CLIPModel.from_pretrained` and
  `CLIPProcessor.from_pretrained` load this folder too.

## Loss curve

![loss](loss.png)

| step | loss | in-batch accuracy (%) | exp(logit scale) |
|---|---|---|---|
{curve}
"""
    (directory / "README.md").write_text(card)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=100)
    ax.plot([h["step"] for h in hist], [h["loss"] for h in hist])
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "loss.png")
    plt.close(fig)


def run(cfg: Config, log=print) -> dict:
    """Renders the corpus, trains the tokenizer and the model, writes the Hugging Face folder."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = Path(cfg.out)
    tag = _hash(cfg)
    images, captions = load_corpus(cfg, out, log)

    tok_dir = out / f"tokenizer-{tag}"
    if (tok_dir / "merges.txt").is_file():
        tokenizer = clip.CLIPTokenizer.from_pretrained(tok_dir)
    else:
        merges = clip.train_bpe(captions[: cfg.tokenizer_captions], num_merges=cfg.max_merges)
        tokenizer = clip.CLIPTokenizer.build(merges, context_length=cfg.context_length)
        tokenizer.save_pretrained(tok_dir)
    ids, _ = tokenizer(captions)
    caption_index: dict[str, int] = {}
    caption_id = np.asarray(
        [caption_index.setdefault(c, len(caption_index)) for c in captions], np.int32
    )
    log(
        f"corpus: {len(captions)} pairs, {len(caption_index)} distinct captions; "
        f"tokenizer: {tokenizer.vocab_size} tokens"
    )

    mcfg = model_config(cfg, tokenizer.vocab_size, tokenizer.eos_id)
    model = clip.CLIP(mcfg)
    key = jax.random.key(cfg.seed)
    params = jax.jit(model.init)(key, normalize(images[:1]), jnp.asarray(ids[:1]))["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )
    state = TrainState.create(params, tx, key=jax.random.fold_in(key, 1))
    step_fn = make_step(
        lambda p, b, rng: contrastive_loss(model, p, b),
        has_aux=True,
        nonfinite="raise",
        post_update=_clamp_scale,
    )

    n = len(captions)
    steps_per_epoch = n // cfg.batch_size

    def batch_at(s: int) -> dict:
        epoch, i = divmod(s, steps_per_epoch)
        perm = np.random.default_rng([cfg.seed, 7, epoch]).permutation(n)
        idx = np.sort(perm[i * cfg.batch_size : (i + 1) * cfg.batch_size])
        return {"images": images[idx], "ids": ids[idx], "caption_id": caption_id[idx]}

    manager = CheckpointManager(out / "ckpt" / f"pretrain-{tag}", keep=1)
    history: list[dict] = []
    start = 0
    restored = manager.restore_latest(state)
    if restored is not None:
        start, state, meta = restored
        history = list(meta.get("history", []))
        log(f"resumed at step {start}")
    window: list[float] = []
    t_train = time.perf_counter()
    for s in _common.progress(range(start, cfg.steps), "pretrain", total=cfg.steps, initial=start):
        state, metrics = step_fn(state, batch_at(s))
        window.append(float(metrics["loss"]))
        done = s + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            history.append(
                {
                    "step": done,
                    "loss": float(np.mean(window)),
                    "accuracy": float(metrics["accuracy"]),
                    "logit_scale": float(np.exp(state.params["logit_scale"])),
                    "wall_s": time.perf_counter() - t_train,
                }
            )
            window = []
        if done % cfg.save_every == 0 or done == cfg.steps:
            manager.save(done, state, metadata={"history": history})
    train_wall = time.perf_counter() - t_train

    folder = out / "miniclip"
    tmp = out / "miniclip.part"
    shutil.rmtree(tmp, ignore_errors=True)
    clip.save_hf_pretrained(state.params, mcfg, tmp)
    tokenizer.save_pretrained(tmp)
    set_special_token_ids(tmp / "config.json", tokenizer)
    write_preprocessor_config(tmp, cfg.image_size)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = {
        "config": dataclasses.asdict(cfg),
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "vocab_size": tokenizer.vocab_size,
        "distinct_captions": len(caption_index),
        "history": history,
        "time": {"wall_s": wall, "cpu_s": cpu, "train_wall_s": train_wall, "resumed_at": start},
        "devices": [str(d) for d in jax.devices()],
    }
    (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(tmp, summary)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    if cfg.export:
        dest = Path(cfg.export)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest)
        log(f"exported to {dest}")
    last = history[-1] if history else {}
    log(
        f"pretrained {cfg.steps} steps: loss {last.get('loss', float('nan')):.3f}, "
        f"wall {wall:.0f} s, CPU {cpu:.0f} s; wrote {folder}"
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Parses ``--preset`` (``default``, ``tiny``) and any field of :class:`Config`, then runs."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0],
        epilog=f"presets: {', '.join(PRESETS)}",
    )
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    preset = args.preset or ("tiny" if os.environ.get("CLJAX_TINY") == "1" else "default")
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    return run(_common.config_from_flags(PRESETS[preset], args))


if __name__ == "__main__":
    main()
