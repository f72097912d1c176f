"""The MiniCLIP setting of ``experiments.zscl`` (the default preset): the embedded benchmark's
tasks through ZSCL's training transform, MiniCLIP's zero-shot heads, and the reference set of
corpus image-caption pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax import losses
from cljax._checks import check_int
from cljax.data import (
    EMBEDDED_TASKS,
    Task,
    corpus_batch,
    embedded_benchmark,
)
from cljax.models import clip

if TYPE_CHECKING:
    from experiments.zscl import EmbeddedConfig


#: The corpus seed of the reference pairs: neither pretraining (0) nor the control task
#: (from 1,000,003) draws it.
REFERENCE_SEED = 2_000_003


class _Preprocessed:
    """A task's training split as MiniCLIP sees it: ``batch_at`` of :class:`cljax.data.Task`
    (shuffled epochs over the whole split, ZSCL's loader), then ZSCL's training transform
    (a random resized crop of 90-100 % of the area, crops fixed by ``(seed, step)``) or only
    the normalisation (its evaluation transform)."""

    def __init__(self, task, *, augment: bool, size: int):
        self.task, self.augment, self.size = task, augment, size

    def batch_at(self, step: int, batch_size: int, *, seed: int = 0) -> dict:
        from experiments.clip_merging import train_preprocess

        b = self.task.batch_at(step, batch_size, seed=seed)
        if self.augment:
            x = train_preprocess(b["x"], np.random.default_rng([seed, step, 0x5EED]), self.size)
        else:
            x = np.asarray(clip.normalize_images(b["x"]))
        return {"x": x, "y": b["y"]}


def _check_embedded(cfg: EmbeddedConfig) -> None:
    from experiments.clip_zscl import check_recipe

    check_recipe(cfg)
    bad = [t for t in cfg.tasks if t not in EMBEDDED_TASKS]
    if bad or len(cfg.tasks) < 2 or len(set(cfg.tasks)) != len(cfg.tasks):
        raise ValueError(
            f"tasks={cfg.tasks} must name at least two distinct tasks of {EMBEDDED_TASKS}"
        )
    if not cfg.seeds:
        raise ValueError("seeds is empty")
    for name in ("train_size", "test_size", "num_reference", "eval_batch_size"):
        check_int(getattr(cfg, name), name=name, where=cfg.preset, low=1)
    check_int(cfg.workers, name="workers", where=cfg.preset, low=0)


def _draw_benchmark(cfg: EmbeddedConfig):
    """The benchmark's tasks of the setting, drawn once and cached under ``<out>/data`` (the
    parent of a ``--workers`` run draws them before its workers start, so that no two
    processes write the same cache file)."""
    return embedded_benchmark(
        0,
        tasks=tuple(cfg.tasks),
        train_size=cfg.train_size,
        val_size=1,
        test_size=cfg.test_size,
        cache_dir=Path(cfg.out) / "data",
    )


def _embedded_env(cfg: EmbeddedConfig) -> dict[str, Any]:
    """MiniCLIP, its zero-shot heads, the benchmark's tasks and the corpus reference set."""
    from experiments.clip_zscl import _NEG

    pre = clip.load_pretrained()
    encoder = pre.image_encoder()
    theta0 = clip.image_encoder_params(pre.params)
    size = pre.model.config.vision.image_size
    bench = _draw_benchmark(cfg)
    scale = pre.logit_scale
    # Zero-shot heads: every class name in every template of its task, through the frozen
    # text tower; padded to one width so that one compiled step serves every task.
    width = max(t.num_classes for t in bench.tasks)
    heads, lwf_texts = {}, {}
    for task in bench.tasks:
        templates = bench.templates[task.name]
        h = clip.zero_shot_head(pre.encode_text, task.classes, templates, logit_scale=scale)
        c = task.num_classes
        heads[task.name] = {
            "kernel": jnp.pad(h["kernel"], ((0, 0), (0, width - c))),
            "bias": jnp.pad(h["bias"], (0, width - c), constant_values=_NEG),
        }
        # lwf.sh's reference texts: the current task's classes in its first template
        lwf_texts[task.name] = losses.reference_embeddings(
            pre.encode_text, [templates[0].format(n) for n in task.classes]
        )
    # The reference set (ImageNet and its captions in ZSCL): image-caption pairs of the
    # pretraining corpus, from a seed MiniCLIP never saw. The captions are embedded once by
    # the frozen text tower.
    ref_x, captions, _ = corpus_batch(REFERENCE_SEED, 0, cfg.num_reference)
    anchors = losses.reference_embeddings(pre.encode_text, captions)
    reference = Task(
        "reference",
        ("corpus",),
        ref_x,
        np.zeros(len(ref_x), np.int32),
        ref_x[:1],
        np.zeros(1, np.int32),
        ref_x[:1],
        np.zeros(1, np.int32),
    )
    features = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
    test_x = {t.name: np.asarray(clip.normalize_images(t.x_test)) for t in bench.tasks}
    bs = cfg.eval_batch_size

    def evaluate(params) -> np.ndarray:
        accs = []
        for task in bench.tasks:
            x, y = test_x[task.name], task.y_test
            hits = 0
            for i in range(0, len(y), bs):
                xb = x[i : i + bs]
                m = len(xb)
                if m < bs:  # pad the last batch: one compiled shape
                    xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
                logits = clip.head_logits(heads[task.name], features(params, xb)[:m])
                hits += int((jnp.argmax(logits, -1) == y[i : i + m]).sum())
            accs.append(100.0 * hits / len(y))
        return np.asarray(accs)

    return {
        "encoder": encoder,
        "theta0": theta0,
        "train_tasks": {
            t.name: _Preprocessed(t, augment=cfg.augment, size=size) for t in bench.tasks
        },
        "tasks": {t.name: _Preprocessed(t, augment=False, size=size) for t in bench.tasks},
        "reference": _Preprocessed(reference, augment=False, size=size),
        "heads": heads,
        "anchors": anchors,
        "lwf_texts": lwf_texts,
        "scale": scale,
        "features": features,
        "evaluate": evaluate,
    }
