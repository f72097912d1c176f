"""ZSCL on an MTIL-style embedded sequence: does distillation + weight ensembling keep the
zero-shot transfer of a pretrained encoder while it learns a sequence of tasks?

Command::

    python -m experiments.zscl                 # embedded preset, 3 seeds
    python -m experiments.zscl --preset tiny   # smoke run (3 tasks, 1 seed)
    python -m experiments.zscl --preset mtil --clip_path CLIP_DIR --data_dir TFDS_DIR
                                               # CLIP on the 11 MTIL datasets: clip_zscl.py

Setting (``cljax.data.mtil_sequence(mtil_domain_tasks())``: the merging benchmark's five
domain-shifted digit tasks; the reference set is MNIST-1D drawn as strokes): a small MLP
encoder pretrained on the benchmark's source task (upright MNIST digits no task uses) and
one frozen head per task
(fitted on the pretrained features: the role of CLIP's zero-shot text heads). The encoder
is fine-tuned on the tasks one after another, each with its own frozen head; after every
task every task is evaluated with its head, so the accuracy matrix ``A[j, i]`` also holds
the "zero-shot" accuracy on tasks not trained yet.
Methods (as WiSE-FT, github.com/mlfoundations/wise-ft, and ZSCL, github.com/Thunderbeee/ZSCL):

* ``finetune``: continual fine-tuning, cross-entropy only (label smoothing 0.2 as ZSCL);
* ``lwf``: + LwF on the previous tasks' heads, teacher = the start-of-task model, T = 2
  (``cljax.losses.lwf_distillation``);
* ``wise_ft``: after each task, ``interpolate(theta_start, theta_ft, 0.8)`` (ZSCL's MTIL
  WiSE-FT baseline: ``--wise_merge --wise_ft_model n --wise_ft_alpha 0.8``);
* ``we``: ZSCL's weight ensemble alone (running mean every ``avg_freq`` iterations, the next
  task starts from it);
* ``distill``: ZSCL's feature distillation alone (teacher = the pretrained encoder, frozen;
  reference images = MNIST-1D strokes; KD at T = 2 over the reference axis + the transposed
  term over the batch axis);
* ``zscl``: distillation + weight ensemble + L2 to the start-of-task weights, summed
  (``cljax.losses.l2_anchor``; ZSCL.sh).

Metrics (ZSCL's, ``cljax.continual``): Transfer (mean over i >= 1 of the accuracy on
task i before it is trained), Avg (mean of the whole matrix), Last (mean of the last row).

Expected runtime: the embedded preset (6 methods x 3 seeds x 5 tasks x 150 steps) takes
about 2 minutes of CPU time, a few minutes on 2 idle cores. ``--preset tiny`` (3 tasks, 6
steps) takes CPU seconds, plus compiles.

Expected result. The paper (MTIL order I): ZSCL keeps the best Transfer (68.1 vs 44.6 for
continual fine-tuning) while its Last stays near or above fine-tuning (83.6 vs 77.3).
Expected here (3 seeds): Transfer / Avg / Last = 75.1 / 76.1 / 74.3 for ZSCL, 63.7 / 68.0 /
64.7 for fine-tuning, zero-shot 84.8 / 83.8 / 83.8 (full table in ``docs/results/zscl.md``).
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
from cljax.averaging import (
    averaging_hook,
    interpolate,
    next_task_from_average,
    weight_ensemble,
)
from cljax.checkpoint import CheckpointManager
from cljax.data import mtil_domain_tasks, mtil_pretraining_data, mtil_sequence
from cljax.models import MLP
from cljax.train import NonFiniteError, TrainState, make_step
from experiments import _common

METHODS = ("finetune", "lwf", "wise_ft", "we", "distill", "zscl")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters of the experiment (flags: ``--name value``)."""

    preset: str = "default"
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
    out: str = "runs/zscl"


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": {
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
    we = weight_ensemble(cfg.avg_freq)
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
        return TrainState.create(_copy(params), tx, rng=0, methods=methods)

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


def _plots(results: dict[str, Any], out: Path) -> None:
    groups = list(results["runs"])
    series, errors = {}, {}
    for key, col in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
        stats = [_common.mean_std([r[key] for r in results["runs"][m]]) for m in groups]
        series[col] = [s[0] for s in stats]
        errors[col] = [s[1] for s in stats]
    _common.bar_chart(
        out / "metrics.png", groups, series, errors=errors, title="MTIL-style digits: ZSCL"
    )
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    if known.preset in ("mtil", "mtil-tiny"):  # CLIP on the MTIL datasets
        from experiments import clip_zscl

        return clip_zscl.main(known.preset, argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    preset = args.preset or Config.preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    base = dataclasses.replace(Config(), preset=preset, **PRESETS[preset])
    if preset != "default" and args.out is None:
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
        _plots(results, out)
    return results


if __name__ == "__main__":
    main()
