"""The digit setting of ``experiments.zscl`` (``--preset digits``): a small MLP encoder
pretrained on upright MNIST with frozen linear probes as its "zero-shot" heads, and the ZSCL
methods run on five domain-shifted digit tasks, seeds side by side under ``vmap``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import continual, losses
from cljax._checks import check_scalar
from cljax.averaging import (
    averaging_hook,
    averaging_next_task,
    interpolate,
    weight_ensemble,
)
from cljax.checkpoint import CheckpointManager
from cljax.data import (
    mtil_domain_tasks,
    mtil_pretraining_data,
    mtil_sequence,
)
from cljax.models import MLP
from cljax.train import NonFiniteError, TrainState, make_step
from experiments import _common
from experiments._clip_zscl_checks import method_flags

if TYPE_CHECKING:
    from experiments.zscl import Config


#: The methods of every ZSCL preset (:func:`method_flags`), in this preset's order of runs.
METHODS = ("finetune", "zscl", "lwf", "wise_ft", "we", "distill")


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


def _engine(method: str, cfg: Config, env: dict[str, Any]):
    """Jitted, seed-vmapped ``init``, ``train_task``, ``end_task`` and ``evaluate``.

    One compilation per method: the task is data (its index picks the frozen head; every
    task's train set is padded to one shape), the steps of a task are a ``lax.scan`` of
    :func:`cljax.train.make_step`, and the seeds run side by side under ``vmap``.
    """
    flags = method_flags(method)
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
            state = averaging_next_task(state, we, name="we")
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
        method_flags(method)  # fail before any work on an unknown method
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
