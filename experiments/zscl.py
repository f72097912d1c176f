"""ZSCL / MTIL on MiniCLIP: does distillation + weight ensembling keep the zero-shot transfer
of a CLIP while it learns a sequence of tasks?

Command::

    python -m experiments.zscl                        # MiniCLIP, embedded benchmark, 3 seeds
    python -m experiments.zscl --preset tiny          # smoke run (3 tasks, 1 seed, toy sizes)
    python -m experiments.zscl --preset digits        # the MLP setting on digit domains
    python -m experiments.zscl --preset mtil --clip_path CLIP_DIR --data_dir TFDS_DIR
                                                      # CLIP on the 11 MTIL datasets: clip_zscl.py

Default setting, as the paper (Zheng et al., ICCV 2023; github.com/Thunderbeee/ZSCL,
``mtil/``) with the embedded foundation in the place of CLIP and its data:

* the model is MiniCLIP (``cljax.models.clip.load_pretrained()``); its image tower is
  fine-tuned, its text tower stays frozen;
* the sequence is six tasks of ``cljax.data.embedded_benchmark()`` in the benchmark's order
  (that of the names of the data sets they stand for, as MTIL order I is): textures, digits,
  signs, mnist, shapes, svhn; each task is classified by its zero-shot head (its class names
  in its prompt templates, through the text tower); after every task every task is
  evaluated, so ``A[j, i]`` also holds the zero-shot accuracy of the tasks not trained yet;
* ZSCL's reference set (ImageNet images, Conceptual Captions texts) is 1,000 image-caption
  pairs of the pretraining corpus (``cljax.data.corpus_batch``) from a seed MiniCLIP never
  saw; the captions are embedded once by the frozen text tower.

Methods (the reference's ``mtil/scripts``), all sharing :func:`experiments.clip_zscl.run_method`:

* ``finetune``: continual fine-tuning, cross-entropy with label smoothing 0.2;
* ``zscl``: distillation + weight ensemble + the summed L2 to the start-of-task weights
  (``ZSCL.sh``);
* ``lwf``: ``lwf.sh``: ZSCL's distillation with the start-of-task model as teacher, the
  current task's images and its class prompts, both terms, ``T^2``-scaled;
* ``wise_ft``: ``WiSE_finetune.sh``: after each task, ``interpolate(theta_start, theta_ft,
  0.8)``;
* ``we``: ``we.sh``-style weight ensemble alone (a snapshot every ``avg_freq`` iterations, the
  next task starts from the mean);
* ``distill``: ZSCL's distillation alone (teacher = the pretrained image tower).

Recipe: ZSCL's, scaled to MiniCLIP: ``steps_per_task + 1`` iterations a task (40 + 1; ZSCL
1,000 + 1), warm-up and ensemble period scaled alike (4; ZSCL 100) so the ensemble holds the
same 11 snapshots including the final weights, AdamW without weight decay and a fresh state
per task, the reference's cosine schedule, batches of 16 training and 16 reference images
(ZSCL 64 and 64), training images through ZSCL's training transform (a random resized crop
of 90-100 % of the area), the loader's shuffled epochs over the whole training split, L2
weight 1 and KD temperature 2 as ``ZSCL.sh``. The learning rate (3e-4) is MiniCLIP's, not
CLIP's 1e-5.

Metrics (ZSCL's, ``cljax.continual``): Transfer (mean over i >= 1 of the accuracy on task i
before it is trained), Avg (mean of the whole matrix), Last (mean of the last row).

Runtime and results: ``docs/results/zscl.md`` (the default preset is about 1,400 s of CPU time,
mostly on one core; ``--preset tiny`` in CPU seconds plus compiles).

The ``digits`` preset is the earlier setting: a small MLP encoder pretrained on upright
MNIST, frozen linear probes as "zero-shot" heads, five domain-shifted digit tasks
(``mtil_domain_tasks``), MNIST-1D strokes as the reference set; its code is ``Config``
and ``run``, above the MiniCLIP preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import continual, losses
from cljax._checks import check_int, check_scalar
from cljax.averaging import (
    averaging_hook,
    interpolate,
    next_task_from_average,
    weight_ensemble,
)
from cljax.checkpoint import CheckpointManager
from cljax.data import (
    EMBEDDED_TASKS,
    Task,
    corpus_batch,
    embedded_benchmark,
    mtil_domain_tasks,
    mtil_pretraining_data,
    mtil_sequence,
)
from cljax.models import MLP, clip
from cljax.train import NonFiniteError, TrainState, make_step
from experiments import _common

METHODS = ("finetune", "zscl", "lwf", "wise_ft", "we", "distill")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters of the experiment (flags: ``--name value``)."""

    preset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] = ()  # training order; empty = the benchmark's order
    steps_per_task: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 15
    label_smoothing: float = 0.2
    # ZSCL
    avg_freq: int = 10
    temperature: float = 2.0
    logit_scale: float = 100.0
    num_reference: int = 1500
    num_anchors: int = 300
    ref_batch_size: int = 64
    distill_weight: float = 1.0
    l2_weight: float = 0.01
    # baselines
    lwf_weight: float = 1.0
    wise_alpha: float = 0.8
    # pretrained encoder and frozen heads
    pretrain_steps: int = 800
    probe_steps: int = 300
    out: str = "runs/zscl_digits"


_DIGIT_REALS = (
    "lr",
    "label_smoothing",
    "temperature",
    "logit_scale",
    "distill_weight",
    "l2_weight",
    "lwf_weight",
    "wise_alpha",
)
DIGIT_PRESETS: dict[str, dict[str, Any]] = {
    "digits": {},
    "digits-tiny": {
        "seeds": (0,),
        "steps_per_task": 6,
        "batch_size": 16,
        "warmup": 2,
        "avg_freq": 2,
        "num_reference": 64,
        "num_anchors": 16,
        "ref_batch_size": 16,
        "pretrain_steps": 30,
        "probe_steps": 20,
        "tasks": ("rotated", "digits", "parity"),
    },
}


# ----------------------------------------------------------------------------- model

ENCODER = MLP(hidden=(256, 128))  # features: the last hidden layer (128, ReLU)
_NEG = -1e9  # bias of the padding classes of the stacked heads


def _encode(params, x):
    return ENCODER.apply({"params": params}, x)


def _head_apply(head, f):
    return f @ head["kernel"] + head["bias"]


def _fit_probe(f, y, num_classes: int, steps: int) -> dict:
    """A linear probe on frozen features (full-batch Adam, small L2)."""
    head = {"kernel": jnp.zeros((f.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
    tx = optax.adam(1e-2)

    def loss(h):
        z = _head_apply(h, f)
        reg = 1e-4 * jnp.sum(h["kernel"] ** 2)
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean() + reg

    def body(carry, _):
        h, o = carry
        u, o = tx.update(jax.grad(loss)(h), o)
        return (optax.apply_updates(h, u), o), None

    return jax.lax.scan(body, (head, tx.init(head)), None, length=steps)[0][0]


def _build_pool(cfg: Config, tasks) -> dict[str, Any]:
    """The pretrained encoder and one frozen linear head per task, cached under ``out/pool``.

    The encoder is pretrained on the merging benchmark's source task (upright, translated
    MNIST digits that no task uses); each task's head is a linear probe fitted on the frozen pretrained features of its training split:
    the role of CLIP's zero-shot text heads (pretrained encoder + this head = the task's
    zero-shot classifier).
    """
    k_init, k_head = jax.random.split(jax.random.key(0))
    params = ENCODER.init(k_init, jnp.zeros((1, 28, 28, 1)))["params"]
    dim = ENCODER.hidden[-1]
    target = {
        "encoder": params,
        "heads": [
            {"kernel": jnp.zeros((dim, t.num_classes)), "bias": jnp.zeros((t.num_classes,))}
            for t in tasks
        ],
    }
    meta = {
        "pretrain_steps": cfg.pretrain_steps,
        "probe_steps": cfg.probe_steps,
        "tasks": [t.name for t in tasks],
        "encoder": repr(ENCODER),
    }
    ckpt = CheckpointManager(Path(cfg.out) / "pool", keep=1)
    try:
        restored = ckpt.restore_latest(target)
    except ValueError:  # a cache of another architecture: rebuild it
        restored = None
    if restored is not None and restored[2] == meta:
        return restored[1]
    if ckpt.steps():  # a cache of other settings
        shutil.rmtree(Path(cfg.out) / "pool")
        ckpt = CheckpointManager(Path(cfg.out) / "pool", keep=1)

    x, y = mtil_pretraining_data()
    src = {
        "encoder": params,
        "head": {"kernel": jax.random.normal(k_head, (dim, 10)) * 0.01, "bias": jnp.zeros(10)},
    }
    tx = optax.adamw(optax.cosine_decay_schedule(1e-3, cfg.pretrain_steps), weight_decay=1e-4)

    @jax.jit
    def pre_step(p, o, xb, yb):
        def loss(p):
            z = _head_apply(p["head"], _encode(p["encoder"], xb))
            return optax.softmax_cross_entropy_with_integer_labels(z, yb).mean()

        u, o = tx.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, u), o

    opt = tx.init(src)
    rng = np.random.default_rng(0)
    for _ in _common.progress(range(cfg.pretrain_steps), "pretrain encoder"):
        idx = rng.integers(0, len(y), 128)
        src, opt = pre_step(src, opt, x[idx], y[idx])
    encoder = src["encoder"]
    feats = jax.jit(_encode)
    fit = jax.jit(_fit_probe, static_argnums=(2, 3))
    heads = []
    for t in tasks:
        f = jnp.concatenate([feats(encoder, b["x"]) for b in t.eval_batches(1000, "train")])
        heads.append(fit(f, jnp.asarray(t.y_train), t.num_classes, cfg.probe_steps))
    pool = {"encoder": encoder, "heads": heads}
    ckpt.save(1, pool, metadata=meta)
    return pool


def _stack_heads(heads: list[dict]) -> dict:
    """``[T, D, Cmax]`` kernels and ``[T, Cmax]`` biases; padding classes get a -1e9 bias."""
    cmax = max(h["bias"].shape[0] for h in heads)
    kernel = jnp.stack(
        [jnp.pad(h["kernel"], ((0, 0), (0, cmax - h["bias"].shape[0]))) for h in heads]
    )
    bias = jnp.stack(
        [jnp.pad(h["bias"], (0, cmax - h["bias"].shape[0]), constant_values=_NEG) for h in heads]
    )
    return {"kernel": kernel, "bias": bias}


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((n - len(a), *a.shape[1:]), a.dtype)])


# ----------------------------------------------------------------------------- the run


def _setup(cfg: Config) -> dict[str, Any]:
    """Tasks, pretrained encoder, stacked frozen heads, and the teacher's cached embeddings."""
    seq = mtil_sequence(
        mtil_domain_tasks(),
        order=list(cfg.tasks) or None,
        num_reference=cfg.num_reference + cfg.num_anchors,
    )
    pool = _build_pool(cfg, seq.tasks)
    params0 = pool["encoder"]
    teacher = jax.jit(lambda x: _encode(params0, x))
    t0 = time.perf_counter()
    anchors = losses.reference_embeddings(teacher, seq.reference[: cfg.num_anchors])
    pool_x = seq.reference[cfg.num_anchors :]
    pool_teacher = losses.reference_embeddings(teacher, pool_x)
    secs = time.perf_counter() - t0
    n_train = max(len(t.y_train) for t in seq.tasks)
    n_test = max(len(t.y_test) for t in seq.tasks)
    return {
        "seq": seq,
        "params": params0,
        "heads": _stack_heads(pool["heads"]),
        "anchors": anchors,
        "pool_x": jnp.asarray(pool_x),
        "pool_teacher": pool_teacher,
        "teacher_seconds": secs,
        # every task padded to one shape: one compilation for all tasks
        "train": [
            (jnp.asarray(_pad_rows(t.x_train, n_train)), jnp.asarray(_pad_rows(t.y_train, n_train)))
            for t in seq.tasks
        ],
        "test_x": jnp.stack([_pad_rows(t.x_test, n_test) for t in seq.tasks]),
        "test_y": jnp.stack([_pad_rows(t.y_test, n_test) for t in seq.tasks]),
        "test_n": jnp.asarray([len(t.y_test) for t in seq.tasks]),
    }


def _optimizer(cfg: Config) -> optax.GradientTransformation:
    # AdamW, weight decay 0, cosine with warm-up, a fresh one per task (ZSCL's
    # mtil/src/models/finetune.py).
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps_per_task, cfg.warmup + 1)
    )
    return optax.adamw(sched, weight_decay=0.0)


def _flags(method: str) -> dict[str, bool]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {
        "lwf": method == "lwf",
        "wise": method == "wise_ft",
        "we": method in ("we", "zscl"),
        "distill": method in ("distill", "zscl"),
        "l2": method == "zscl",
    }


def _engine(method: str, cfg: Config, env: dict[str, Any]):
    """Jitted, seed-vmapped ``init``, ``train_task``, ``end_task`` and ``evaluate``.

    One compilation per method: the task is data (its index picks the frozen head; every
    task's train set is padded to one shape), the steps of a task are a ``lax.scan`` of
    :func:`cljax.train.make_step`, and the seeds run side by side under ``vmap``.
    """
    flags = _flags(method)
    heads, anchors = env["heads"], env["anchors"]
    pool_x, pool_teacher = env["pool_x"], env["pool_teacher"]
    tx = _optimizer(cfg)
    we = weight_ensemble(every=cfg.avg_freq)
    n_tasks = heads["bias"].shape[0]

    def logits_all(params, x):  # [B, T, Cmax], every task's frozen head
        f = _encode(params, x)
        return jnp.einsum("bd,tdc->btc", f, heads["kernel"]) + heads["bias"]

    def loss_fn(params, batch, rng):
        del rng
        task = batch["task"]
        z = logits_all(params, batch["x"])
        zt = z[:, task]
        valid = heads["bias"][task] > _NEG / 2
        onehot = jax.nn.one_hot(batch["y"], zt.shape[-1])
        target = (1 - cfg.label_smoothing) * onehot + cfg.label_smoothing * valid / valid.sum()
        ce = jnp.mean(optax.softmax_cross_entropy(zt, target))
        loss, aux = ce, {"ce": ce}
        if flags["lwf"]:
            # LwF: the start-of-task model's outputs on the previous tasks' heads (T = 2).
            old = logits_all(batch["start"], batch["x"])
            per_head = jax.vmap(
                lambda s, t, w: losses.lwf_distillation(s, t, temperature=cfg.temperature, where=w),
                in_axes=(1, 1, 0),
            )(z, old, heads["bias"] > _NEG / 2)
            prev = jnp.arange(n_tasks) < task
            lwf = jnp.sum(jnp.where(prev, per_head, 0.0)) / jnp.maximum(prev.sum(), 1)
            loss, aux = loss + cfg.lwf_weight * lwf, {**aux, "lwf": lwf}
        if flags["distill"]:
            student = _encode(params, pool_x[batch["ref"]])
            kd, _ = losses.zscl_distillation(
                student,
                pool_teacher[batch["ref"]],
                anchors,
                temperature=cfg.temperature,
                logit_scale=cfg.logit_scale,
            )
            loss, aux = loss + cfg.distill_weight * kd, {**aux, "kd": kd}
        if flags["l2"]:
            l2 = losses.l2_anchor(params, batch["start"], reduction="sum")
            loss, aux = loss + cfg.l2_weight * l2, {**aux, "l2": l2}
        return loss, aux

    post = averaging_hook({"we": we}) if flags["we"] else None
    step = make_step(loss_fn, has_aux=True, post_update=post, jit=False)

    def init(params):
        methods = {"start": _copy(params)}
        if flags["we"]:
            methods["we"] = we.init(params)
        return TrainState.create(_copy(params), tx, key=0, methods=methods)

    def train_task(state, x, y, idx, ref, task):
        def body(st, inp):
            i, r = inp
            batch = {"x": x[i], "y": y[i], "ref": r, "task": task, "start": st.methods["start"]}
            st, m = step(st, batch)
            return st, m["loss"]

        return jax.lax.scan(body, state, (idx, ref))

    def end_task(state):
        if flags["we"]:  # the next task starts from the ensemble (and a fresh optimizer)
            state = next_task_from_average(state, we, name="we")
        if flags["wise"]:  # WiSE-FT toward the start-of-task model, alpha on the fine-tuned end
            params = interpolate(state.methods["start"], state.params, cfg.wise_alpha)
            state = state.replace(params=params)
        return state.replace(
            opt_state=tx.init(state.params),
            methods={**state.methods, "start": _copy(state.params)},
        )

    def evaluate(params):  # [T] accuracies, each task with its own head
        def one(x, y, n, t):
            pred = jnp.argmax(logits_all(params, x)[:, t], -1)
            return jnp.sum((pred == y) & (jnp.arange(len(y)) < n)) / n

        return jax.vmap(one)(env["test_x"], env["test_y"], env["test_n"], jnp.arange(n_tasks))

    return {
        "init": jax.jit(jax.vmap(init, axis_size=len(cfg.seeds), in_axes=None)),
        "train_task": jax.jit(
            jax.vmap(train_task, in_axes=(0, None, None, 0, 0, None)), donate_argnums=(0,)
        ),
        "end_task": jax.jit(jax.vmap(end_task), donate_argnums=(0,)),
        "evaluate": jax.jit(jax.vmap(evaluate)),
        "tx": tx,
    }


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _schedules(cfg: Config, task, j: int, n_pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Per seed: the train-batch indices ``[S, B]`` and the reference-batch indices ``[S, R]``."""
    idx, ref = [], []
    for seed in cfg.seeds:
        rows = [
            _batch_rows(task, s, cfg.batch_size, seed * 1000 + j) for s in range(cfg.steps_per_task)
        ]
        idx.append(np.stack(rows))
        order = np.random.default_rng([seed, j, 7]).permutation(n_pool)
        starts = np.arange(cfg.steps_per_task)[:, None] * cfg.ref_batch_size
        ref.append(order[(starts + np.arange(cfg.ref_batch_size)) % n_pool])
    return np.stack(idx).astype(np.int32), np.stack(ref).astype(np.int32)


def _batch_rows(task, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The rows :meth:`Task.batch_at` would gather (same shuffle), for an on-device gather."""
    n = len(task.y_train)
    epoch, i = divmod(step, task.steps_per_epoch(batch_size))
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return np.sort(perm[i * batch_size : (i + 1) * batch_size])


def _check_no_skipped(state: TrainState, method: str, j: int, task: str, seeds) -> None:
    """Stops the run before a task with a non-finite step is evaluated or checkpointed.

    The scanned step (``make_step``'s default ``nonfinite="raise"``, traced) skips a
    non-finite update and counts it in ``state.skipped``; here that count becomes the error.
    """
    skipped = np.asarray(state.skipped)
    if skipped.any():
        bad = [(seed, int(n)) for seed, n in zip(seeds, skipped, strict=True) if n]
        raise NonFiniteError(
            f"{method}: non-finite loss, gradient or update in task {j} ({task!r}) "
            f"(seed, skipped steps): {bad}; nothing of this task was checkpointed"
        )


def run(cfg: Config) -> dict[str, Any]:
    """Runs every method (seeds side by side); returns the dict written to ``results.json``.

    Seeds change the order of the training batches and of the reference batches; the
    pretrained encoder and the heads are the same for every seed (one "CLIP").
    """
    for method in cfg.methods:
        _flags(method)  # fail before any work on an unknown method
    for name in _DIGIT_REALS:  # finite settings, checked before any work
        check_scalar(getattr(cfg, name), name=name, where=cfg.preset)
    out = Path(cfg.out)
    t_setup = time.perf_counter()
    env = _setup(cfg)
    seq = env["seq"]
    names = list(seq.names)
    n_tasks, n_seeds = len(names), len(cfg.seeds)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "tasks": names,
        "reference_source": seq.reference_source,
        "teacher_embedding_seconds": env["teacher_seconds"],
        "setup_seconds": time.perf_counter() - t_setup,
        "runs": {},
    }
    zero_shot = None
    fingerprint = json.loads(  # as the checkpoint's JSON metadata holds it (tuples -> lists)
        json.dumps(
            {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("methods", "out")}
        )
    )
    for method in cfg.methods:
        t0 = time.perf_counter()
        eng = _engine(method, cfg, env)
        state = eng["init"](env["params"])
        if zero_shot is None:
            zero_shot = 100.0 * np.asarray(eng["evaluate"](state.params))[0]
        acc = np.zeros((n_seeds, n_tasks, n_tasks))
        ckpt = CheckpointManager(out / "ckpt" / method, keep=1)
        start = 0
        try:
            restored = ckpt.restore_latest({"state": state, "acc": acc})
        except ValueError:  # another configuration's checkpoint: start over
            restored = None
        if restored is not None and restored[2].get("config") == fingerprint:
            start = restored[0]
            state = restored[1]["state"].replace(tx=eng["tx"])
            acc = np.asarray(restored[1]["acc"])
        elif ckpt.steps():  # another configuration's run: start this method over
            shutil.rmtree(out / "ckpt" / method)
            ckpt = CheckpointManager(out / "ckpt" / method, keep=1)
        for j in _common.progress(range(start, n_tasks), method, total=n_tasks - start):
            x, y = env["train"][j]
            idx, ref = _schedules(cfg, seq.tasks[j], j, env["pool_x"].shape[0])
            state, _ = eng["train_task"](state, x, y, idx, ref, j)
            _check_no_skipped(state, method, j, names[j], cfg.seeds)
            state = eng["end_task"](state)
            acc[:, j] = 100.0 * np.asarray(eng["evaluate"](state.params))
            ckpt.save(j + 1, {"state": state, "acc": acc}, metadata={"config": fingerprint})
        results["runs"][method] = [
            {
                "seed": seed,
                "accuracy": acc[k].tolist(),
                "transfer": continual.mtil_transfer(acc[k]),
                "avg": continual.mtil_avg(acc[k]),
                "last": continual.mtil_last(acc[k]),
            }
            for k, seed in enumerate(cfg.seeds)
        ]
        results.setdefault("seconds_per_method", {})[method] = time.perf_counter() - t0
        results.setdefault("resumed_from", {})[method] = start
    results["zero_shot"] = zero_shot.tolist()
    return results


def summarize(results: dict[str, Any]) -> tuple[str, list[dict]]:
    """The markdown table (mean ± std over seeds) and its rows."""
    zs = np.asarray(results["zero_shot"])
    zs_mat = np.tile(zs, (len(zs), 1))
    rows = [
        {
            "method": "zero-shot",
            "Transfer": f"{continual.mtil_transfer(zs_mat):.1f}",
            "Avg": f"{continual.mtil_avg(zs_mat):.1f}",
            "Last": f"{continual.mtil_last(zs_mat):.1f}",
        }
    ]
    for method, runs in results["runs"].items():
        row = {"method": method}
        for key, col in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
            m, s = _common.mean_std([r[key] for r in runs])
            row[col] = f"{m:.1f} ± {s:.1f}"
        rows.append(row)
    return _common.format_table(rows, ["method", "Transfer", "Avg", "Last"]), rows


def matrices(results: dict[str, Any]) -> str:
    """The seed-mean accuracy matrix of every method, as markdown tables."""
    names = results["tasks"]
    parts = []
    for method, runs in results["runs"].items():
        a = np.mean([r["accuracy"] for r in runs], axis=0)
        rows = [
            {"after": f"{j}:{names[j]}", **{n: float(a[j, i]) for i, n in enumerate(names)}}
            for j in range(len(names))
        ]
        parts.append(f"**{method}** (A[j, i], seed mean)\n\n" + _common.format_table(rows))
    return "\n\n".join(parts)


def _plots(results: dict[str, Any], out: Path, *, title: str) -> None:
    groups = list(results["runs"])
    series, errors = {}, {}
    for key, col in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
        stats = [_common.mean_std([r[key] for r in results["runs"][m]]) for m in groups]
        series[col] = [s[0] for s in stats]
        errors[col] = [s[1] for s in stats]
    _common.bar_chart(out / "metrics.png", groups, series, errors=errors, title=title)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 2.8), squeeze=False)
    for ax, m in zip(axes[0], groups, strict=True):
        a = np.mean([r["accuracy"] for r in results["runs"][m]], axis=0)
        ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("evaluated task i", fontsize=7)
        ax.set_ylabel("after task j", fontsize=7)
        for (j, i), v in np.ndenumerate(a):
            ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
    fig.tight_layout()
    fig.savefig(out / "matrices.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------- MiniCLIP on the benchmark


@dataclasses.dataclass(frozen=True)
class EmbeddedConfig:
    """The default preset: ZSCL / MTIL with MiniCLIP on the embedded benchmark (flags:
    ``--name value``). The recipe is ZSCL's (``mtil/scripts/ZSCL.sh``) scaled to MiniCLIP:
    1,000 iterations become ``steps_per_task``, the warm-up (100) and the ensemble period
    (100) scale with them, so a task still ends with the ensemble of 11 snapshots."""

    preset: str = "default"
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    # MTIL-style: the benchmark's tasks in its order (that of their stand-ins' names, as MTIL
    # order I), less greek and letters, which fine-tuning does not learn (docs/results/zscl.md)
    tasks: tuple[str, ...] = ("textures", "digits", "signs", "mnist", "shapes", "svhn")
    train_size: int = 1000
    test_size: int = 150
    steps_per_task: int = 40  # + 1, as the reference's range(iterations + 1)
    batch_size: int = 16
    lr: float = 3e-4
    fast_lr: float = 3e-4
    fast_lr_tasks: tuple[str, ...] = ()
    warmup: int = 4
    augment: bool = True  # ZSCL's training transform: RandomResizedCrop(scale=(0.9, 1.0))
    label_smoothing: float = 0.2
    avg_freq: int = 4
    temperature: float = 2.0
    distill_weight: float = 1.0
    l2_weight: float = 1.0
    wise_alpha: float = 0.8
    num_reference: int = 1000  # corpus image-caption pairs: reference images and texts
    ref_batch_size: int = 16
    eval_batch_size: int = 150
    out: str = "runs/zscl"


EMBEDDED_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
        "seeds": (0,),
        "tasks": ("textures", "digits", "signs"),
        "train_size": 32,
        "test_size": 16,
        "steps_per_task": 2,
        "batch_size": 8,
        "warmup": 1,
        "avg_freq": 1,
        "num_reference": 24,
        "ref_batch_size": 8,
        "eval_batch_size": 16,
    },
}
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


def _embedded_env(cfg: EmbeddedConfig) -> dict[str, Any]:
    """MiniCLIP, its zero-shot heads, the benchmark's tasks and the corpus reference set."""
    from experiments.clip_zscl import _NEG

    pre = clip.load_pretrained()
    encoder = pre.image_encoder()
    theta0 = clip.image_encoder_params(pre.params)
    size = pre.model.config.vision.image_size
    bench = embedded_benchmark(
        0,
        tasks=tuple(cfg.tasks),
        train_size=cfg.train_size,
        val_size=1,
        test_size=cfg.test_size,
        cache_dir=Path(cfg.out) / "data",
    )
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


def run_embedded(cfg: EmbeddedConfig) -> dict[str, Any]:
    """The default preset: every method, every seed; returns what ``results.json`` holds."""
    from experiments.clip_zscl import run_method

    _check_embedded(cfg)
    out = Path(cfg.out)
    t0, c0 = time.perf_counter(), time.process_time()
    env = _embedded_env(cfg)
    zero_shot = env["evaluate"](env["theta0"])
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "tasks": list(cfg.tasks),
        "reference": {"source": f"corpus_batch(seed={REFERENCE_SEED})", "pairs": cfg.num_reference},
        "zero_shot": zero_shot.tolist(),
        "setup_seconds": time.perf_counter() - t0,
        "setup_cpu_seconds": time.process_time() - c0,
        "runs": {},
    }
    fingerprint = json.loads(
        json.dumps(
            {
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k not in ("methods", "out", "seeds", "eval_batch_size")
            }
        )
    )
    for method in cfg.methods:
        t1, c1 = time.perf_counter(), time.process_time()
        per_seed = run_method(
            method, cfg, env, out / "ckpt" / method, fingerprint, seeds=tuple(cfg.seeds)
        )
        results["runs"][method] = [
            {
                "seed": seed,
                "accuracy": acc.tolist(),
                "transfer": continual.mtil_transfer(acc),
                "avg": continual.mtil_avg(acc),
                "last": continual.mtil_last(acc),
                "resumed_from": start,
            }
            for seed, (acc, start) in zip(cfg.seeds, per_seed, strict=True)
        ]
        results.setdefault("seconds_per_method", {})[method] = time.perf_counter() - t1
        results.setdefault("cpu_seconds_per_method", {})[method] = time.process_time() - c1
    return results


def _targets(results: dict[str, Any]) -> list[dict]:
    """The issue's targets, checked on the seed means."""
    zs = np.asarray(results["zero_shot"])
    zs_transfer = continual.mtil_transfer(np.tile(zs, (len(zs), 1)))
    mean = {
        m: {k: float(np.mean([r[k] for r in runs])) for k in ("transfer", "last")}
        for m, runs in results["runs"].items()
    }
    rows = []
    if "zscl" in mean and "finetune" in mean:
        z, f = mean["zscl"], mean["finetune"]
        rows += [
            {
                "target": "Transfer >= fine-tuning's + 5",
                "measured": f"{z['transfer']:.1f} vs {f['transfer'] + 5:.1f}",
                "met": "yes" if z["transfer"] >= f["transfer"] + 5 else "no",
            },
            {
                "target": "Transfer >= 90 % of zero-shot's",
                "measured": f"{z['transfer']:.1f} vs {0.9 * zs_transfer:.1f}",
                "met": "yes" if z["transfer"] >= 0.9 * zs_transfer else "no",
            },
            {
                "target": "Last >= fine-tuning's",
                "measured": f"{z['last']:.1f} vs {f['last']:.1f}",
                "met": "yes" if z["last"] >= f["last"] else "no",
            },
        ]
        best = max(mean, key=lambda m: mean[m]["transfer"])
        rows.append(
            {
                "target": "ZSCL best on Transfer",
                "measured": f"best: {best} ({mean[best]['transfer']:.1f})",
                "met": "yes" if best == "zscl" else "no",
            }
        )
    return rows


# Every preset of the three settings; ``--preset NAME --help`` lists that setting's flags.
PRESET_NAMES = (*EMBEDDED_PRESETS, *DIGIT_PRESETS, "mtil", "mtil-tiny")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    preset = known.preset or EmbeddedConfig.preset
    if preset in ("mtil", "mtil-tiny"):  # CLIP on the MTIL datasets
        from experiments import clip_zscl

        return clip_zscl.main(preset, argv)
    if preset in DIGIT_PRESETS:
        return _main_digits(preset, argv)
    if preset not in EMBEDDED_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESET_NAMES)}")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            f"presets: {', '.join(EMBEDDED_PRESETS)} (MiniCLIP, the flags above); "
            f"{', '.join(DIGIT_PRESETS)} (the MLP setting) and mtil, mtil-tiny (CLIP): "
            "--preset NAME --help lists their flags"
        ),
    )
    _common.add_config_flags(parser, EmbeddedConfig, presets=PRESET_NAMES)
    args = parser.parse_args(argv)
    base = dataclasses.replace(EmbeddedConfig(), preset=preset, **EMBEDDED_PRESETS[preset])
    if preset != "default" and args.out is None:
        base = dataclasses.replace(base, out=f"runs/zscl_{preset}")
    cfg = _common.config_from_flags(base, args)
    t0 = time.perf_counter()
    results = run_embedded(cfg)
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = time.process_time()
    table, rows = summarize(results)
    results["table"] = rows
    results["targets"] = _targets(results)
    if _common.is_primary():
        out = Path(cfg.out)
        print(f"\nZSCL / MTIL on MiniCLIP, tasks {results['tasks']}, seeds {cfg.seeds}\n")
        print(table)
        if results["targets"]:
            print("\n" + _common.format_table(results["targets"]))
        print("\n" + matrices(results))
        print(f"\nzero-shot row: {np.round(results['zero_shot'], 1).tolist()}")
        print(f"total {results['seconds']:.0f}s wall, {results['cpu_seconds']:.0f}s CPU")
        _common.write_json(out / "results.json", results)
        _plots(results, out, title="ZSCL / MTIL on MiniCLIP")
    return results


def _main_digits(preset: str, argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    base = dataclasses.replace(Config(), preset=preset, **DIGIT_PRESETS[preset])
    if preset != "digits" and args.out is None:
        base = dataclasses.replace(base, out=f"runs/zscl_{preset}")
    cfg = _common.config_from_flags(base, args)
    t0 = time.perf_counter()
    results = run(cfg)
    results["seconds"] = time.perf_counter() - t0
    table, rows = summarize(results)
    results["table"] = rows
    if _common.is_primary():
        out = Path(cfg.out)
        print(f"\nZSCL on {len(results['tasks'])} tasks {results['tasks']}, seeds {cfg.seeds}\n")
        print(table)
        print("\n" + matrices(results))
        print(f"\nzero-shot row: {np.round(results['zero_shot'], 1).tolist()}")
        print(f"total {results['seconds']:.0f}s")
        _common.write_json(out / "results.json", results)
        _plots(results, out, title="MTIL-style digits: ZSCL")
    return results


if __name__ == "__main__":
    main()
