"""ZSCL on MTIL with CLIP: learn 11 datasets in sequence, keep the zero-shot transfer.

Real-scale preset of the ZSCL experiment (Zheng et al., ICCV 2023;
github.com/Thunderbeee/ZSCL): the CLIP image encoder (Hugging Face safetensors) is
fine-tuned on the MTIL datasets one after another (order I: Aircraft, Caltech101, CIFAR100,
DTD, EuroSAT, Flowers, Food, MNIST, OxfordPet, StanfordCars, SUN397, read through TFDS),
each task classified by its frozen zero-shot head (class names × prompt templates through
the *pretrained* text tower). After every task every dataset is evaluated, so the 11×11
accuracy matrix also holds the zero-shot accuracy on the datasets not trained yet. Methods:

* ``finetune``: continual fine-tuning, cross-entropy with label smoothing 0.2;
* ``lwf``: LwF as the reference's ``mtil/scripts/lwf.sh``: ZSCL's distillation with the
  start-of-task model as teacher, the current task's (unaugmented) training images as
  reference images and its class prompts (first template) as reference texts, both terms,
  ``T^2``-scaled;
* ``wise_ft``: after each task, ``interpolate(theta_start, theta_ft, wise_alpha)``;
* ``we``: ZSCL's weight ensemble alone (a snapshot every ``avg_freq`` iterations, the next
  task starts from the running mean, :func:`cljax.averaging.weight_ensemble`);
* ``distill``: ZSCL's feature distillation alone (teacher = the pretrained image encoder,
  frozen; reference images from ``--reference_images``; reference texts = the captions of
  ``--captions`` embedded once by the pretrained text tower; KD at T = 2 over the caption
  axis plus the transposed term over the batch, :func:`cljax.losses.zscl_distillation`);
* ``zscl``: distillation + weight ensemble + the summed L2 to the start-of-task weights
  (``l2_weight`` 1, as ``ZSCL.sh``).

The recipe is the reference's (``mtil/scripts/ZSCL.sh``): 1,000 + 1 iterations of batch 64
per task (its loop runs ``range(iterations + 1)``; the last iteration has learning rate 0 and
its weight-ensemble snapshot is the final weights), AdamW with weight decay 0, lr 1e-5 (5e-5 for Aircraft and MNIST), its cosine schedule
with 100 warm-up iterations and a fresh optimiser per task, label smoothing 0.2, WE every
100 iterations, training images through a random resized crop of 90-100 % of the area (its
training transform), reference batches of 64 ImageNet training images without augmentation.
Metrics (ZSCL's, :mod:`cljax.continual`): Transfer, Avg and Last of the accuracy matrix.

Command (TFDS datasets prepared under ``--data_dir``; a text file of reference captions,
one per line, e.g. the Conceptual Captions validation captions)::

    python -m experiments.zscl --preset mtil --clip_path /ckpt/clip-vit-base-patch16 \\
        --data_dir /data/tfds --captions /data/gcc_val_captions.txt --out runs/zscl-mtil

Every (method, task) is checkpointed: a re-run with the same ``--out`` resumes after the last
finished task. Runtime: not measured here (no TPU in this project's CI); 11,000 training
iterations of ViT-B/16 per method plus 11 evaluations of the 11 test sets.

Expected (the reference's ``results.ipynb``, CLIP ViT-B/16, MTIL order I, Transfer / Avg /
Last): zero-shot 69.4 / 65.3 / 65.3, continual fine-tuning 44.6 / 55.9 / 77.3, WiSE-FT
52.3 / 60.7 / 77.7, ZSCL 68.1 / 75.4 / 83.6.

Deviations (also in ``docs/deviations.md``): only the image encoder is trained; the text tower stays
at its pretrained weights, so the zero-shot heads are fixed (the reference trains both
towers, its cross-entropy going through the current text encoder with one template per
dataset). Without ``--captions`` the reference texts are the prompts of every class of the
sequence (the reference uses ~15k Conceptual Captions).

The ``mtil-tiny`` preset (``--preset mtil-tiny``) builds a tiny random CLIP, a toy tokenizer
and mock TFDS data, for tests.

The recipe's checks (shared with ``experiments.zscl``) live in
``experiments/_clip_zscl_checks.py``, the table and figure in ``experiments/_clip_zscl_report.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import continual, losses
from cljax.averaging import averaging_hook, averaging_next_task, interpolate, weight_ensemble
from cljax.checkpoint import CheckpointManager
from cljax.models import clip
from cljax.train import NonFiniteError, TrainState, make_step
from experiments import _common
from experiments._clip_zscl_checks import (  # noqa: F401 (re-exported)
    METHODS,
    _validate,
    check_recipe,
    method_flags,
)
from experiments._clip_zscl_report import _plot, summarize
from experiments.clip_merging import cosine_lr

#: MTIL order I (ZSCL; CIFAR10 is evaluated by the reference but left out of its metrics).
MTIL_ORDER_I = (
    "aircraft",
    "caltech101",
    "cifar100",
    "dtd",
    "eurosat",
    "flowers",
    "food",
    "mnist",
    "pets",
    "cars",
    "sun397",
)
_NEG = -1e9  # bias of the padding classes of the zero-shot heads


@dataclasses.dataclass(frozen=True)
class ClipZsclConfig:
    """Settings of the CLIP MTIL run (flags: ``--name value``)."""

    preset: str = "mtil"
    clip_path: str = ""  # a Hugging Face CLIP folder (config.json, model.safetensors)
    data_dir: str = ""
    out: str = "runs/zscl-mtil"
    tasks: tuple[str, ...] = MTIL_ORDER_I
    methods: tuple[str, ...] = ("finetune", "wise_ft", "zscl")
    steps_per_task: int = 1000
    batch_size: int = 64
    lr: float = 1e-5
    fast_lr: float = 5e-5
    fast_lr_tasks: tuple[str, ...] = ("aircraft", "mnist")
    warmup: int = 100  # ZSCL's --warmup_length (task_vectors' 500 is another recipe)
    augment: bool = True  # ZSCL's training transform: RandomResizedCrop(scale=(0.9, 1.0))
    label_smoothing: float = 0.2
    avg_freq: int = 100
    temperature: float = 2.0
    distill_weight: float = 1.0
    l2_weight: float = 1.0
    wise_alpha: float = 0.8
    reference_images: str = "tfds:imagenet2012"
    captions: str = ""  # text file, one reference caption per line
    max_captions: int = 0  # 0 = all
    ref_batch_size: int = 64
    eval_batch_size: int = 256
    max_eval_batches: int = 0  # 0 = the whole test split
    seed: int = 0


PRESETS: dict[str, ClipZsclConfig] = {
    "mtil": ClipZsclConfig(),
    "mtil-tiny": ClipZsclConfig(
        preset="mtil-tiny",
        out="runs/zscl-mtil-tiny",
        tasks=("cifar100", "eurosat", "mnist"),
        methods=("finetune", "zscl"),
        steps_per_task=3,
        batch_size=8,
        warmup=1,
        avg_freq=1,
        reference_images="tfds:cifar10",
        ref_batch_size=16,  # = eval_batch_size: the teacher shares the evaluation's compile
        eval_batch_size=16,
        max_eval_batches=1,
    ),
}


def _tiny_clip(workdir: Path, seed: int) -> tuple[str, clip.CLIPConfig]:
    """A random tiny CLIP saved as a Hugging Face checkpoint (the tests' stand-in)."""
    config, params = _common.tiny_clip(np.random.default_rng(seed), vision_layers=1)
    clip.save_hf_pretrained(params, config, workdir / "clip")
    return str(workdir / "clip"), config


def _pad_head(head: dict, width: int) -> dict:
    c = head["bias"].shape[0]
    return {
        "kernel": jnp.pad(head["kernel"], ((0, 0), (0, width - c))),
        "bias": jnp.pad(head["bias"], (0, width - c), constant_values=_NEG),
    }


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def run(cfg: ClipZsclConfig) -> dict[str, Any]:
    """Runs every method of ``cfg`` over the sequence; returns what ``results.json`` holds."""
    from cljax.data import TFDSTask
    from experiments.clip_merging import AugmentedTask, _hf_tokenizer, _toy_tokenize

    _validate(cfg)
    out = Path(cfg.out)
    tiny = cfg.preset == "mtil-tiny"
    tmp = tempfile.TemporaryDirectory() if tiny else None
    if tiny:
        clip_path, config = _tiny_clip(Path(tmp.name), cfg.seed)
        tokenize = _toy_tokenize
    else:
        if not cfg.clip_path:
            raise ValueError(
                "--clip_path is required: a Hugging Face CLIP folder (config.json, model.safetensors)"
            )
        clip_path = cfg.clip_path
        config = clip.config_from_hf(json.loads((Path(clip_path) / "config.json").read_text()))
        tokenize = _hf_tokenizer(clip_path)

    model, encoder = clip.CLIP(config), clip.CLIPImageEncoder(config)
    full = clip.load_hf_safetensors(clip_path, model)
    theta0 = clip.load_hf_safetensors(clip_path, encoder)
    size = config.vision.image_size
    data_dir = cfg.data_dir or None
    tasks = {t: TFDSTask(t, data_dir=data_dir, image_size=size, seed=0) for t in cfg.tasks}
    # The task's training batches go through ZSCL's training transform; evaluation and the
    # reference images through the eval transform, as the reference.
    train_tasks = {
        t: AugmentedTask(t, data_dir=data_dir, image_size=size) if cfg.augment else tasks[t]
        for t in cfg.tasks
    }
    reference = TFDSTask(cfg.reference_images, data_dir=data_dir, image_size=size, seed=0)
    scale = 100.0 if tiny else float(np.exp(np.asarray(full["logit_scale"])))
    text_tower = jax.jit(
        lambda ids: model.apply({"params": full}, ids, method=clip.CLIP.encode_text)
    )

    def encode_text(ids: np.ndarray) -> jax.Array:  # rows padded to a power of two: few compiles
        n = len(ids)
        rows = max(8, 1 << (n - 1).bit_length())
        return text_tower(np.concatenate([ids, np.zeros((rows - n, ids.shape[1]), ids.dtype)]))[:n]

    # Frozen zero-shot heads, padded to one width: one compiled step serves every task.
    width = max(t.num_classes for t in tasks.values())
    heads = {
        t: _pad_head(
            clip.zero_shot_head(
                lambda s: encode_text(tokenize(s)),
                task.classes,
                clip.TEMPLATES.get(t, clip.TEMPLATES["generic"]),
                logit_scale=scale,
                cache_dir=out / "heads",
                cache_key=clip_path,
            ),
            width,
        )
        for t, task in tasks.items()
    }
    # Reference texts, embedded once by the pretrained text tower (the reference re-embeds
    # them every iteration; they never change).
    if cfg.captions:
        texts = [s.strip() for s in Path(cfg.captions).read_text().splitlines() if s.strip()]
        source = cfg.captions
    else:
        texts = [f"a photo of a {c}." for task in tasks.values() for c in task.classes]
        source = "class prompts of the sequence"
    if cfg.max_captions:
        texts = texts[: cfg.max_captions]
    if not texts:
        raise ValueError(f"no reference caption in {cfg.captions!r}")
    anchors = losses.reference_embeddings(encode_text, tokenize(texts), batch_size=256)
    # LwF's reference texts (lwf.sh): the current task's class names in its first template.
    lwf_texts = {
        t: losses.reference_embeddings(
            encode_text,
            tokenize(
                [
                    clip.TEMPLATES.get(t, clip.TEMPLATES["generic"])[0].format(c)
                    for c in task.classes
                ]
            ),
        )
        for t, task in tasks.items()
    }

    features = jax.jit(lambda p, x: encoder.apply({"params": p}, x))

    def evaluate(params) -> np.ndarray:
        accs = []
        for t in cfg.tasks:
            hits = n = 0
            for i, b in enumerate(tasks[t].eval_batches(cfg.eval_batch_size)):
                if cfg.max_eval_batches and i == cfg.max_eval_batches:
                    break
                m, x = len(b["y"]), b["x"]
                if m < cfg.eval_batch_size:  # pad the last batch: one compiled shape
                    pad = np.zeros((cfg.eval_batch_size - m, *x.shape[1:]), x.dtype)
                    x = np.concatenate([x, pad])
                logits = clip.head_logits(heads[t], features(params, x)[:m])
                hits += int((jnp.argmax(logits, -1) == b["y"]).sum())
                n += m
            accs.append(100.0 * hits / max(n, 1))
        return np.asarray(accs)

    zero_shot = evaluate(theta0)
    fingerprint = json.loads(
        json.dumps(
            {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("methods", "out")}
        )
    )
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "tasks": list(cfg.tasks),
        "reference_texts": {"source": source, "count": len(texts)},
        "zero_shot": zero_shot.tolist(),
        "runs": {},
    }
    for method in cfg.methods:
        t0 = time.perf_counter()
        env = {
            "encoder": encoder,
            "theta0": theta0,
            "tasks": tasks,
            "train_tasks": train_tasks,
            "reference": reference,
            "heads": heads,
            "anchors": anchors,
            "lwf_texts": lwf_texts,
            "scale": scale,
            "evaluate": evaluate,
            "features": features,
        }
        ((acc, start),) = run_method(
            method, cfg, env, out / "ckpt" / method, fingerprint, seeds=(cfg.seed,)
        )
        results["runs"][method] = {
            "accuracy": acc.tolist(),
            "transfer": continual.mtil_transfer(acc),
            "avg": continual.mtil_avg(acc),
            "last": continual.mtil_last(acc),
            "resumed_from": start,
            "seconds": time.perf_counter() - t0,
        }
    if tmp is not None:
        tmp.cleanup()
    return results


def run_method(
    method: str,
    cfg: Any,
    env: dict[str, Any],
    ckpt_dir: Path,
    fingerprint: dict,
    *,
    seeds: tuple[int, ...] = (0,),
) -> list[tuple[np.ndarray, int]]:
    """Trains ``method`` over the sequence once per seed (one compiled step for all seeds).

    Shared by every CLIP preset of the ZSCL experiment (MTIL with a Hugging Face CLIP, and
    MiniCLIP on the embedded benchmark). ``cfg`` carries the recipe (``tasks``,
    ``steps_per_task``, ``batch_size``, ``lr``, ``fast_lr``, ``fast_lr_tasks``, ``warmup``,
    ``label_smoothing``, ``avg_freq``, ``temperature``, ``distill_weight``, ``l2_weight``,
    ``wise_alpha``, ``ref_batch_size``); ``env`` the model and data:

    * ``encoder``, ``theta0``: the image encoder module and its pretrained params;
    * ``train_tasks`` / ``tasks``: per task name, objects whose ``batch_at(step, batch_size,
      seed=...)`` gives training batches through the training / evaluation transform;
    * ``heads``: frozen zero-shot heads padded to one width (bias ``-1e9`` on padding);
    * ``reference``: ``batch_at`` of the reference images (ZSCL's ImageNet);
    * ``anchors``: ``[K, D]`` normalised reference text embeddings (computed once);
    * ``lwf_texts``: per task, ``[C, D]`` normalised embeddings of its class prompts;
    * ``scale``: the logit scale; ``features``: ``(params, x) -> features`` (jitted);
    * ``evaluate``: ``params -> [T]`` test accuracies in %.

    Each task runs ``steps_per_task + 1`` iterations, as the reference's ``range(iterations
    + 1)``: the cosine schedule reaches 0 at the last one, so with ``avg_freq`` dividing
    ``steps_per_task`` the weight ensemble's last snapshot is the final weights. Every
    finished (seed, task) is checkpointed under ``ckpt_dir / f"seed{seed}"``; a re-run with
    the same ``fingerprint`` resumes after it.

    Returns:
      Per seed, the accuracy matrix ``A[j, i]`` (%) and the task it resumed from.
    """
    encoder = env["encoder"]
    flags = method_flags(method)
    we = weight_ensemble(every=cfg.avg_freq)
    ls = cfg.label_smoothing

    def loss_fn(params, batch, rng):
        del rng
        n = len(batch["y"])
        x = batch["x"]
        if "ref_x" in batch:  # one forward pass of the task and the reference images
            x = jnp.concatenate([x, batch["ref_x"]])
        feats = encoder.apply({"params": params}, x)
        z = clip.head_logits(batch["head"], feats[:n])
        valid = batch["head"]["bias"] > _NEG / 2  # the task's real classes
        target = (1 - ls) * jax.nn.one_hot(batch["y"], z.shape[-1]) + ls * valid / valid.sum()
        ce = jnp.mean(optax.softmax_cross_entropy(z, target))
        loss, aux = ce, {"ce": ce}
        if "ref_x" in batch:  # ZSCL's distillation; LwF is the same loss with other inputs
            kd, _ = losses.zscl_distillation(
                feats[n:],
                batch["ref_teacher"],
                batch["ref_texts"],
                temperature=cfg.temperature,
                logit_scale=env["scale"],
            )
            loss, aux = loss + cfg.distill_weight * kd, {**aux, "kd": kd}
        if flags["l2"]:
            l2 = losses.l2_anchor(params, batch["anchor"], reduction="sum")
            loss, aux = loss + cfg.l2_weight * l2, {**aux, "l2": l2}
        return loss, aux

    step = make_step(
        loss_fn, has_aux=True, post_update=averaging_hook({"we": we}) if flags["we"] else None
    )
    # AdamW without weight decay, the reference's cosine schedule with warm-up (its
    # utils.cosine_lr), a fresh state per task. The peak learning rate is a hyperparameter
    # in the state, so the tasks with the larger rate share the compiled step.
    tx = optax.chain(
        optax.scale_by_adam(),
        optax.scale_by_schedule(cosine_lr(1.0, cfg.warmup, cfg.steps_per_task)),
        optax.inject_hyperparams(optax.scale)(step_size=-cfg.lr),
    )

    def new_state(params, task: str, seed: int) -> TrainState:
        lr = cfg.fast_lr if task in cfg.fast_lr_tasks else cfg.lr
        methods = {"we": we.init(params)} if flags["we"] else {}
        state = TrainState.create(params, tx, key=seed, methods=methods)
        adam, sched, scale = state.opt_state
        scale = scale._replace(hyperparams={"step_size": jnp.asarray(-lr, jnp.float32)})
        return state.replace(opt_state=(adam, sched, scale))

    return [
        _run_seed(
            method,
            cfg,
            env,
            flags,
            we,
            step,
            new_state,
            ckpt_dir / f"seed{seed}",
            fingerprint,
            seed,
        )
        for seed in seeds
    ]


def _run_seed(method, cfg, env, flags, we, step, new_state, ckpt_dir, fingerprint, seed):
    """One seed of :func:`run_method`: the sequence, checkpointed task by task."""
    theta0, heads = env["theta0"], env["heads"]
    n = len(cfg.tasks)
    acc = np.zeros((n, n))
    params = _copy(theta0)
    ckpt = CheckpointManager(ckpt_dir, keep=1)
    start = 0
    try:
        restored = ckpt.restore_latest({"params": params, "acc": acc})
    except ValueError:  # a checkpoint of another model: start over
        restored = None
    if restored is not None and restored[2].get("config") == fingerprint:
        start, tree = restored[0], restored[1]
        params, acc = tree["params"], np.asarray(tree["acc"])
    elif ckpt.steps():  # another configuration's run
        shutil.rmtree(ckpt_dir)
        ckpt = CheckpointManager(ckpt_dir, keep=1)

    desc = f"{method} seed {seed}"
    for j in _common.progress(range(start, n), desc, total=n - start):
        name = cfg.tasks[j]
        anchor = _copy(params)  # the start-of-task weights: teacher of LwF, L2 anchor, WiSE-FT
        state = new_state(params, name, seed)
        data_seed = seed * 1000 + j
        for s in range(cfg.steps_per_task + 1):
            b = env["train_tasks"][name].batch_at(s, cfg.batch_size, seed=data_seed)
            batch = {"x": b["x"], "y": b["y"], "head": heads[name], "anchor": anchor}
            if flags["distill"]:  # reference images, the frozen pretrained teacher
                r = env["reference"].batch_at(
                    j * (cfg.steps_per_task + 1) + s, cfg.ref_batch_size, seed=seed
                )
                teacher, texts = theta0, env["anchors"]
            elif flags["lwf"]:  # lwf.sh: the current task's images, the previous model
                r = env["tasks"][name].batch_at(s, cfg.ref_batch_size, seed=data_seed + 500)
                teacher, texts = anchor, env["lwf_texts"][name]
            if flags["distill"] or flags["lwf"]:
                # the frozen teacher's features, outside the differentiated step
                batch |= {
                    "ref_x": r["x"],
                    "ref_teacher": env["features"](teacher, r["x"]),
                    "ref_texts": texts,
                }
            try:
                state, _ = step(state, batch)
            except NonFiniteError as e:  # name the method and task; nothing was checkpointed
                raise NonFiniteError(f"{method}: task {j} ({name!r}): {e}", state=e.state) from e
        if flags["we"]:  # the saved model, and the next task's start, is the ensemble
            state = averaging_next_task(state, we, name="we")
        params = state.params
        if flags["wise"]:
            params = interpolate(anchor, params, cfg.wise_alpha)
        acc[j] = env["evaluate"](params)
        ckpt.save(j + 1, {"params": params, "acc": acc}, metadata={"config": fingerprint})
    return acc, start


def main(preset: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point from ``experiments.zscl`` for ``--preset mtil`` / ``mtil-tiny``.

    Raises:
      ValueError: for an unknown preset, method or dataset, a missing ``--clip_path``, or
        bad sizes.
    """
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    _common.add_config_flags(parser, ClipZsclConfig)
    cfg = _common.config_from_flags(PRESETS[preset], parser.parse_args(argv))
    cfg = dataclasses.replace(cfg, preset=preset)
    t0 = time.perf_counter()
    if preset == "mtil-tiny":
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=32):
            results = run(cfg)
    else:
        results = run(cfg)
    results["seconds"] = time.perf_counter() - t0
    if _common.is_primary():
        out = Path(cfg.out)
        table = summarize(results)
        print(f"\nZSCL on MTIL {results['tasks']}\n\n{table}")
        print(f"\nzero-shot row: {np.round(results['zero_shot'], 1).tolist()}")
        _common.write_json(out / "results.json", results)
        (out / "table.md").write_text(table + "\n")
        _plot(results, out / "matrices.png")
    return results


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m experiments.clip_zscl [--preset mtil|mtil-tiny] [flags]``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=ClipZsclConfig.preset)
    known, _ = pre.parse_known_args(argv)
    return main(known.preset, argv)


if __name__ == "__main__":
    cli()
