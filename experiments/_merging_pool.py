"""The pool of ``experiments.merging``: a pretrained encoder, frozen per-task heads and one
fine-tuned encoder per task, each stage trained once and restored from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import merging
from cljax.checkpoint import CheckpointManager
from cljax.data import Task, embedded_benchmark, merging_benchmark
from cljax.models import ViT, clip
from cljax.train import TrainState, make_step
from experiments import _common

if TYPE_CHECKING:
    from experiments.merging import Config


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
    """A pretrained encoder, frozen per-task heads, and one fine-tuned encoder per task.

    Attributes:
      config: the settings the pool was built with.
      encoder: a flax module; ``encoder.apply({"params": p}, x)`` gives the features that
        the heads read: for the embedded benchmark, MiniCLIP's image encoder on uint8
        images with the CLIP normalisation in front and an L2 normalisation behind (so a
        zero-shot head is a plain linear map); for the digit benchmark, the ViT's features.
      pretrained: θ_0, the pretrained encoder's params dict.
      heads: ``{task: {"kernel": [D, C], "bias": [C]}}``, fitted on θ_0's features, frozen.
      tasks: the target tasks (:class:`cljax.data.Task`), in order.
      finetuned: θ_t per task, in task order.
      task_vectors: τ_t = θ_t − θ_0 per task, in task order.
      source: the control task (embedded: drawn from the pretraining distribution, with its
        zero-shot head in ``heads["control"]``; digits: the pretraining task).
      stages: ``{"trained": [...], "restored": [...]}``: what :func:`build_pool` trained in
        this call and what it restored from checkpoints.
    """

    config: Config
    encoder: Any
    pretrained: dict
    heads: dict[str, dict]
    tasks: tuple[Task, ...]
    finetuned: tuple[dict, ...]
    task_vectors: tuple[dict, ...]
    source: Task
    stages: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> Task:
        if name == "control" or (name not in self.names and name == self.source.name):
            return self.source
        return self.tasks[self.names.index(name)]

    def logits(self, params: dict, task: str, x: jax.Array) -> jax.Array:
        """Encoder ``params`` followed by the frozen head of ``task`` (jit-able)."""
        h = self.heads[task]
        return self.encoder.apply({"params": params}, x) @ h["kernel"] + h["bias"]

    def features(self, params: dict, x: np.ndarray) -> np.ndarray:
        """Encoder features of a numpy batch, in fixed-size jitted chunks (one compilation)."""
        return _features(self.encoder, params, x, self.config.eval_batch)

    def evaluate(self, params: dict, task: str, split: str = "test") -> float:
        """Top-1 accuracy (%) of encoder ``params`` with the frozen head of ``task``."""
        x, y = self.task(task).split(split)
        return _accuracy(self.features(params, x), y, self.heads[task])

    def evaluate_all(self, params: dict, split: str = "test") -> dict[str, float]:
        """``{task: accuracy}`` for every task; one batched pass over all of them."""
        xs = [t.split(split)[0] for t in self.tasks]
        feats = self.features(params, np.concatenate(xs))
        out, start = {}, 0
        for t, x in zip(self.tasks, xs, strict=True):
            f = feats[start : start + len(x)]
            out[t.name] = _accuracy(f, t.split(split)[1], self.heads[t.name])
            start += len(x)
        return out


@functools.cache
def _features_fn(encoder: Any) -> Callable:
    return jax.jit(lambda p, x: encoder.apply({"params": p}, x))


def _features(encoder: Any, params: dict, x: np.ndarray, batch: int) -> np.ndarray:
    fn = _features_fn(encoder)
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if n < batch:  # pad so every call has the compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(params, chunk))[:n])
    if not out:
        raise ValueError("no inputs to encode")
    return np.concatenate(out)


def _accuracy(features: np.ndarray, labels: np.ndarray, head: dict) -> float:
    logits = features @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == labels))


def _hash(cfg: Config, fields: tuple[str, ...], extra: str = "") -> str:
    blob = json.dumps({f: getattr(cfg, f) for f in fields}, sort_keys=True) + extra
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


_DATA = ("seed", "train_size", "test_size", "source_size")
_MODEL = ("patch_size", "hidden_dim", "depth", "num_heads", "mlp_dim")
_PRETRAIN = ("pretrain_steps", "pretrain_lr", "pretrain_batch", "weight_decay", "warmup_fraction")
_PRETRAIN += ("clip_norm",)
_HEADS = ("head_l2",)
_FINETUNE = ("finetune_steps", "finetune_lr", "finetune_batch", "weight_decay")
_FINETUNE += ("warmup_fraction", "clip_norm")


def _optimizer(cfg: Config, lr: float, steps: int) -> optax.GradientTransformation:
    warmup = max(1, int(cfg.warmup_fraction * steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train(
    ckpt_dir: Path,
    state: TrainState,
    step_fn: Callable,
    batch_at: Callable[[int], dict],
    steps: int,
    *,
    save_every: int,
    desc: str,
) -> tuple[TrainState, bool]:
    """Runs ``steps`` steps from the last checkpoint in ``ckpt_dir``; returns (state, trained)."""
    manager = CheckpointManager(ckpt_dir, keep=1)
    restored = manager.restore_latest(state)
    start = 0
    if restored is not None:
        start, state, _ = restored
    if start >= steps:
        return state, False
    for s in _common.progress(range(start, steps), desc=desc, total=steps, initial=start):
        state, metrics = step_fn(state, batch_at(s))
        done = s + 1
        if done == steps or done % save_every == 0:
            manager.save(done, state, metadata={"loss": float(metrics["loss"])})
    return state, True


def _strip_head(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "head"}


def _fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float) -> dict:
    """Multinomial logistic regression, ``mean CE + l2/2·‖W‖²``, by L-BFGS (deterministic).

    scikit-learn minimises ``C·Σ CE + ½‖W‖²``, the same objective with ``C = 1/(l2·N)``.
    """
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(labels)
    if len(classes) != num_classes:
        raise ValueError(f"head: the train split has classes {classes}, expected {num_classes}")
    clf = LogisticRegression(C=1.0 / (l2 * len(labels)), max_iter=300, tol=1e-4)
    clf.fit(features.astype(np.float64), labels)
    kernel, bias = clf.coef_.T, clf.intercept_
    if num_classes == 2:  # scikit-learn keeps one logit for binary problems
        kernel = np.concatenate([-kernel / 2, kernel / 2], axis=1)
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def _pad_head(head: dict, width: int) -> dict:
    """Pads a head to ``width`` classes; the padded logits are -1e9 (probability 0)."""
    c = head["bias"].shape[0]
    return {
        "kernel": jnp.pad(head["kernel"], ((0, 0), (0, width - c))),
        "bias": jnp.pad(head["bias"], (0, width - c), constant_values=-1e9),
    }


class ZeroShotEncoder(clip.CLIPImageEncoder):
    """CLIP's image encoder as the pool uses it: uint8 images in, L2-normalised features out.

    Its params are :class:`cljax.models.clip.CLIPImageEncoder`'s (``vision_model``,
    ``visual_projection``), so task vectors and merges see the plain CLIP tree.
    """

    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __call__(self, images: jax.Array) -> jax.Array:
        f = super().__call__(clip.normalize_images(images, self.mean, self.std))
        return f / jnp.linalg.norm(f, axis=-1, keepdims=True)


def _finetune_all(
    config: Config,
    encoder: Any,
    pretrained: dict,
    heads: dict,
    tasks: tuple[Task, ...],
    ckpt: Path,
    tag: str,
    stats: dict,
    key: jax.Array,
) -> list[dict]:
    """Fine-tunes ``encoder`` from ``pretrained`` on each task with its head frozen.

    The head travels with the batch, padded to the largest number of classes (padded logits
    get a -1e9 bias, so their probability is exactly 0): one compiled step serves every task.
    """

    def finetune_loss(p, batch, rng):
        feats = encoder.apply({"params": p}, batch["x"])
        return _cross_entropy(feats @ batch["kernel"] + batch["bias"], batch["y"])

    step_fn = make_step(finetune_loss, nonfinite="raise")
    tx = _optimizer(config, config.finetune_lr, config.finetune_steps)  # one static tx: no retrace
    width = max(t.num_classes for t in tasks)
    finetuned = []
    ft_tag = _hash(config, _FINETUNE, tag)
    for i, t in enumerate(tasks):
        state = TrainState.create(pretrained, tx, key=jax.random.fold_in(key, 100 + i))
        head = _pad_head(heads[t.name], width)

        def batch_at(s, t=t, head=head, i=i):
            return {**t.batch_at(s, config.finetune_batch, seed=config.seed + 1 + i), **head}

        state, trained = _train(
            ckpt / f"finetune-{t.name}-{ft_tag}",
            state,
            step_fn,
            batch_at,
            config.finetune_steps,
            save_every=config.save_every,
            desc=f"fine-tune {t.name}",
        )
        stats["trained" if trained else "restored"].append(f"finetune-{t.name}")
        finetuned.append(state.params)
    return finetuned


def _pool(config, encoder, pretrained, heads, tasks, finetuned, source, stats, log) -> Pool:
    """The :class:`Pool` of fine-tuned encoders, with their task vectors; logs what was trained."""
    task_vectors = tuple(merging.task_vector(f, pretrained) for f in finetuned)
    log(f"pool: trained {stats['trained'] or 'nothing'}, restored {stats['restored'] or 'nothing'}")
    return Pool(
        config, encoder, pretrained, heads, tasks, tuple(finetuned), task_vectors, source, stats
    )


def _build_embedded_pool(config: Config, out: Path, log: Callable) -> Pool:
    """MiniCLIP (or the CLIP at ``clip_path``), zero-shot heads, one fine-tune per task."""
    ckpt = out / "ckpt"
    stats: dict[str, Any] = {"trained": [], "restored": []}
    bench = embedded_benchmark(
        config.seed,
        tasks=config.tasks,
        train_size=config.train_size,
        val_size=config.val_size,
        test_size=config.test_size,
        cache_dir=out / "data",
        workers=config.workers,
    )
    pre = clip.load_pretrained(config.clip_path or None)
    encoder = ZeroShotEncoder(pre.model.config, mean=pre.mean, std=pre.std)
    pretrained = clip.image_encoder_params(pre.params)
    # Zero-shot heads: class names in the task's templates through the pretrained text tower,
    # scaled by the model's learned logit scale; frozen and never merged, as in task_vectors.
    heads = {}
    for t in (*bench.tasks, bench.control):
        heads[t.name] = clip.zero_shot_head(
            pre.encode_text, t.classes, bench.templates[t.name], logit_scale=pre.logit_scale
        )
    weights = hashlib.sha256((pre.path / "model.safetensors").read_bytes()).hexdigest()[:10]
    tag = _hash(config, _DATA + ("val_size",), weights)
    key = jax.random.key(config.seed)
    finetuned = _finetune_all(
        config, encoder, pretrained, heads, bench.tasks, ckpt, tag, stats, key
    )
    return _pool(
        config, encoder, pretrained, heads, bench.tasks, finetuned, bench.control, stats, log
    )


def build_pool(
    config: Config, out_dir: str | os.PathLike | None = None, *, log: Callable = print
) -> Pool:
    """Builds the pool of fine-tuned models, restoring every finished stage.

    Embedded benchmark: loads MiniCLIP, builds the zero-shot heads, fine-tunes the image
    encoder on each task. Digit benchmark: pretrains a ViT, fits frozen heads, fine-tunes.

    Args:
      config: the experiment settings (e.g. ``PRESETS["default"]``).
      out_dir: output folder; checkpoints go to ``<out_dir>/ckpt``. Default ``config.out``.
      log: where progress lines go.

    Returns:
      The :class:`Pool`; ``pool.stages`` says which stages were trained and which restored.
    """
    if config.benchmark not in ("embedded", "digits"):
        raise ValueError(f"benchmark={config.benchmark!r} must be 'embedded' or 'digits'")
    out = Path(out_dir if out_dir is not None else config.out)
    if config.benchmark == "embedded":
        return _build_embedded_pool(config, out, log)
    ckpt = out / "ckpt"
    stats: dict[str, Any] = {"trained": [], "restored": []}
    bench = merging_benchmark(
        config.seed,
        tasks=config.tasks,
        train_size=config.train_size,
        test_size=config.test_size,
        source_size=config.source_size,
    )
    model_kw = {f: getattr(config, f) for f in _MODEL}
    encoder = ViT(**model_kw)
    key = jax.random.key(config.seed)
    x0 = bench.source.x_train[:1]

    # 1. Pretraining: encoder + a temporary 10-way head on the source task.
    full = ViT(**model_kw, num_classes=bench.source.num_classes)
    params = jax.jit(full.init)(key, x0)["params"]
    tx = _optimizer(config, config.pretrain_lr, config.pretrain_steps)
    state = TrainState.create(params, tx, key=jax.random.fold_in(key, 1))

    def pretrain_loss(p, batch, rng):
        return _cross_entropy(full.apply({"params": p}, batch["x"]), batch["y"])

    tag = _hash(config, _DATA + _MODEL + _PRETRAIN)
    state, trained = _train(
        ckpt / f"pretrain-{tag}",
        state,
        make_step(pretrain_loss),
        lambda s: bench.source.batch_at(s, config.pretrain_batch, seed=config.seed),
        config.pretrain_steps,
        save_every=config.save_every,
        desc="pretrain",
    )
    stats["trained" if trained else "restored"].append("pretrain")
    pretrained = _strip_head(state.params)

    # 2. Frozen heads on the pretrained features (the zero-shot heads' role).
    head_dir = ckpt / f"heads-{_hash(config, _HEADS + ('tasks',), tag)}"
    target = {
        t.name: {
            "kernel": jnp.zeros((config.hidden_dim, t.num_classes), jnp.float32),
            "bias": jnp.zeros((t.num_classes,), jnp.float32),
        }
        for t in bench.tasks
    }
    manager = CheckpointManager(head_dir, keep=1)
    restored = manager.restore_latest(target)
    if restored is None:
        heads = {}
        for t in _common.progress(bench.tasks, desc="heads"):
            feats = _features(encoder, pretrained, t.x_train, config.eval_batch)
            heads[t.name] = _fit_head(feats, t.y_train, t.num_classes, config.head_l2)
        manager.save(0, heads)
        stats["trained"].append("heads")
    else:
        heads = restored[1]
        stats["restored"].append("heads")

    # 3. Fine-tuning: the encoder on each task, its head frozen.
    finetuned = _finetune_all(
        config, encoder, pretrained, heads, bench.tasks, ckpt, tag + head_dir.name, stats, key
    )
    return _pool(
        config, encoder, pretrained, heads, bench.tasks, finetuned, bench.source, stats, log
    )
