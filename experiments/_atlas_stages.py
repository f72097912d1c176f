"""The parts of ``experiments.atlas``: task addition (and aTLAS×K), negation, few-shot and
test-time adaptation, each against its task-arithmetic baseline, on one seed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.merging import atlas, select_scale, task_arithmetic
from experiments._atlas_pool import Pool

if TYPE_CHECKING:
    from experiments.atlas import Config


_compose = jax.jit(atlas.compose, static_argnums=3)
_task_arithmetic = jax.jit(task_arithmetic)
_negate = jax.jit(lambda pre, tau, lam: jax.tree.map(lambda p, t: p - lam * t, pre, tau))


class _Accuracy:
    """Accuracy of an encoder and frozen heads, from the encoder's features.

    The features of one parameter set are computed once for every image set it is scored
    on (:meth:`many`: all tasks' validation splits in one pass, the target and the control
    task together), in chunks of ``eval_batch`` with the last chunk padded to a multiple of
    ``_GRANULE`` rows: few compiled shapes, little padding. The heads (a matrix product on
    the features) run on the host. θ0's features of a task's split are kept: the pretrained
    model, the linear probe and the test-time baselines score them again and again.
    """

    def __init__(self, pool: Pool, eval_batch: int):
        self.pool = pool
        self.eval_batch = eval_batch
        self._encode = jax.jit(pool.encode)
        self._theta0: dict[tuple[str, str], np.ndarray] = {}

    def features(self, enc, x: np.ndarray) -> np.ndarray:
        """``encode(enc, x)`` as a float32 numpy array, in padded chunks."""
        b, n, out = self.eval_batch, len(x), []
        for i in range(0, n, b):
            xb = x[i : i + b]
            m = len(xb)
            size = min(b, -(-m // _GRANULE) * _GRANULE)
            if m < size:
                xb = np.concatenate([xb, np.zeros((size - m, *xb.shape[1:]), xb.dtype)])
            out.append(np.asarray(self._encode(enc, xb))[:m])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def _task_features(self, enc, task, split: str) -> np.ndarray | None:
        if enc is self.pool.pretrained:
            return self._theta0.get((task.name, split))
        return None

    def many(self, enc, items) -> list[float]:
        """Accuracies of ``enc`` with each ``(head, task, split)`` or ``(head, x, y)`` of
        ``items``, the images of all items encoded in one pass."""
        resolved, todo = [], []
        for head, a, b in items:
            if not isinstance(b, str):  # (head, x, y)
                resolved.append((head, None, a, b))
                todo.append(a)
                continue
            x, y = a.split(b)
            f = self._task_features(enc, a, b)
            resolved.append((head, f, x, y))
            if f is None:
                todo.append(x)
        feats = self.features(enc, np.concatenate(todo)) if todo else None
        at, accs = 0, []
        for (head, f, x, y), item in zip(resolved, items, strict=True):
            if f is None:
                f, at = feats[at : at + len(x)], at + len(x)
                if enc is self.pool.pretrained and isinstance(item[2], str):
                    self._theta0[(item[1].name, item[2])] = f
            accs.append(self.score(f, head, y))
        return accs

    def score(self, feats: np.ndarray, head, y: np.ndarray) -> float:
        """Accuracy of ``head`` on precomputed features."""
        if len(y) == 0:
            return 0.0
        logits = np.asarray(self.pool.head_apply(jax.device_get(head), feats))
        return float(np.mean(np.argmax(logits, -1) == y))

    def on(self, enc, head, x, y) -> float:
        return self.many(enc, [(head, x, y)])[0]

    def __call__(self, enc, head, task, split: str) -> float:
        return self.many(enc, [(head, task, split)])[0]


_GRANULE = 64  # evaluation chunks are padded to a multiple of this many rows


def _cycle_batch(x: np.ndarray, y: np.ndarray | None, batch: int, step: int, seed: int) -> dict:
    """Batch ``step`` of a shuffled pass over (x, y), with replacement across epochs."""
    n = len(x)
    per_epoch = max(n // batch, 1)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch:  # fewer examples than a batch: sample with replacement
        idx = np.random.default_rng([seed, step, 1]).integers(0, n, batch)
    else:
        idx = perm[i * batch : (i + 1) * batch]
    out = {"x": x[idx]}
    if y is not None:
        out["y"] = y[idx]
    return out


def _strong_view(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strong augmentation of [N, H, W, C] images in [0, 1]: shift, contrast, noise."""
    n = len(x)
    out = np.empty_like(x)
    for i in range(n):
        dy, dx = rng.integers(-3, 4, size=2)
        out[i] = np.roll(x[i], (dy, dx), axis=(0, 1))
    c = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1)).astype(x.dtype)
    out = (out - 0.5) * c + 0.5 + rng.normal(0, 0.1, size=x.shape).astype(x.dtype)
    return np.clip(out, 0.0, 1.0)


def _cap(cfg: Config, steps: int) -> int:
    steps = max(int(steps), 1)
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def _grid(cfg: Config, points: int = 0) -> list[float]:
    """``points`` (default ``cfg.lambda_grid``) evenly spaced λ on [0, 1]."""
    n = points or cfg.lambda_grid
    return [float(v) for v in np.round(np.linspace(0.0, 1.0, n), 4)]


def _k_shot(task, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = task.split("train")
    rng = np.random.default_rng([seed, k])
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:k] for c in range(task.num_classes)]
    )
    return x[idx], y[idx]


# ----------------------------------------------------------------------------- parts


def run_addition(
    pool: Pool, cfg: Config, seed: int, accuracy, ft_acc, partitions: int | None = None
) -> dict:
    tasks, heads = pool.tasks, pool.heads
    t = len(tasks)
    spec = atlas.blocks(pool.pretrained, partitions=partitions, seed=seed)
    objective = _objective(pool, "addition", t)
    tx = _optimizer("addition", cfg.addition_lr)
    vals = [task.split("val") for task in tasks]
    steps = min(len(v[1]) for v in vals) // cfg.addition_batch

    def batch_at(s):
        return [
            {**_cycle_batch(x, y, cfg.addition_batch, s, seed * 100 + i), "head": heads[i]}
            for i, (x, y) in enumerate(vals)
        ]

    def evaluate(theta):
        accs = accuracy.many(theta, [(heads[i], tasks[i], "val") for i in range(t)])
        return {
            "normalized": float(
                np.nanmean(
                    [a / f if f > 0 else np.nan for a, f in zip(accs, ft_acc["val"], strict=True)]
                )
            )
        }

    res = atlas.fit(
        objective,
        pool.pretrained,
        pool.task_vectors,
        batch_at,
        epochs=cfg.addition_epochs,
        steps_per_epoch=_cap(cfg, steps),
        spec=spec,
        optimizer=tx,
        evaluate=evaluate,
        score="normalized",
        seed=seed,
    )
    theta = _compose(pool.pretrained, pool.task_vectors, res.coefficients, spec)
    test = accuracy.many(theta, [(heads[i], tasks[i], "test") for i in range(t)])
    return {
        "absolute": 100 * float(np.mean(test)),
        "normalized": 100
        * float(np.mean([a / f for a, f in zip(test, ft_acc["test"], strict=True) if f > 0])),
        "per_task": test,
        "best_epoch": res.best_epoch,
        "val_normalized": 100 * float(res.best_score),
        "history": res.history,
        "coefficients": spec.num_coefficients(t),
    }


def run_task_arithmetic(pool: Pool, cfg: Config, accuracy, ft_acc) -> dict:
    tasks, heads = pool.tasks, pool.heads
    merge = _task_arithmetic

    def val_score(lam):
        theta = merge(pool.pretrained, pool.task_vectors, lam)
        accs = accuracy.many(theta, [(heads[i], tasks[i], "val") for i in range(len(tasks))])
        return float(np.mean([a / f for a, f in zip(accs, ft_acc["val"], strict=True) if f > 0]))

    grid = _grid(cfg)
    lam, scores = select_scale(val_score, grid)
    theta = merge(pool.pretrained, pool.task_vectors, lam)
    test = accuracy.many(theta, [(heads[i], tasks[i], "test") for i in range(len(tasks))])
    return {
        "lambda": lam,
        "val_normalized": 100 * float(scores[grid.index(lam)]),
        "val_scores": [100 * float(v) for v in scores],
        "absolute": 100 * float(np.mean(test)),
        "normalized": 100
        * float(np.mean([a / f for a, f in zip(test, ft_acc["test"], strict=True) if f > 0])),
        "per_task": test,
    }


def run_negation(pool: Pool, cfg: Config, seed: int, accuracy) -> dict:
    ctask, chead = pool.control
    floor_val = cfg.control_threshold * accuracy(pool.pretrained, chead, ctask, "val")
    score = atlas.negation_score(floor_val)
    tx = _optimizer("negation", cfg.negation_lr)
    objective = _objective(pool, "negation")
    out = {"aTLAS": [], "task arithmetic": [], "pretrained": []}
    for i, task in enumerate(pool.tasks):
        tau = jax.tree.map(lambda v, i=i: v[i : i + 1], pool.task_vectors)
        tx_, ty = task.split("val")
        cx, cy = ctask.split("val")

        def batch_at(s, i=i, tx_=tx_, ty=ty, cx=cx, cy=cy):
            return {
                "target": {
                    **_cycle_batch(tx_, ty, cfg.negation_batch, s, seed),
                    "head": pool.heads[i],
                },
                "control": {**_cycle_batch(cx, cy, cfg.negation_batch, s, seed + 1), "head": chead},
            }

        def evaluate(theta, i=i, task=task):
            target, control = accuracy.many(
                theta, [(pool.heads[i], task, "val"), (chead, ctask, "val")]
            )
            return {"target_accuracy": target, "control_accuracy": control}

        res = atlas.fit(
            objective,
            pool.pretrained,
            tau,
            batch_at,
            epochs=cfg.negation_epochs,
            steps_per_epoch=_cap(cfg, len(ty) // cfg.negation_batch),
            optimizer=tx,
            evaluate=evaluate,
            score=score,
            stop=lambda m: m["control_accuracy"] < floor_val,
            seed=seed,
        )
        theta = _compose(pool.pretrained, tau, res.coefficients, atlas.blocks(pool.pretrained))
        pairs = [(pool.heads[i], task, "test"), (chead, ctask, "test")]
        out["aTLAS"].append(tuple(accuracy.many(theta, pairs)))
        out["pretrained"].append(tuple(accuracy.many(pool.pretrained, pairs)))
        if seed == cfg.seeds[0]:  # deterministic: once
            out["task arithmetic"].append(_ta_negation(pool, cfg, i, accuracy, floor_val))
    return out


def _ta_negation(pool: Pool, cfg: Config, i: int, accuracy, floor_val: float):
    ctask, chead = pool.control
    task = pool.tasks[i]
    tau = jax.tree.map(lambda v: v[i], pool.task_vectors)
    merge = lambda lam: _negate(pool.pretrained, tau, lam)

    def val_score(lam):
        target, control = accuracy.many(
            merge(lam), [(pool.heads[i], task, "val"), (chead, ctask, "val")]
        )
        return np.nan if control < floor_val else target

    lam, _ = select_scale(val_score, _grid(cfg), maximize=False)
    return tuple(accuracy.many(merge(lam), [(pool.heads[i], task, "test"), (chead, ctask, "test")]))


def _others(pool: Pool, h: int):
    keep = [i for i in range(len(pool.tasks)) if i != h]
    return jax.tree.map(lambda v: v[np.asarray(keep)], pool.task_vectors)


def run_few_shot(pool: Pool, cfg: Config, seed: int, accuracy) -> dict:
    """Per held-out task and k: aTLAS, linear probe, task arithmetic (accuracy, %)."""
    objective = _objective(pool, "supervised")
    tx = _optimizer("few_shot", cfg.few_shot_lr, total=cfg.few_shot_steps)
    spec = atlas.blocks(pool.pretrained)
    out: dict[str, dict[str, list[float]]] = {}
    for h, task in enumerate(pool.tasks):
        taus = _others(pool, h)
        head = pool.heads[h]
        shots = {k: _k_shot(task, k, seed) for k in cfg.shots}
        ta = _ta_few_shot(pool, cfg, taus, head, task, shots, accuracy)
        for k in cfg.shots:
            x, y = shots[k]

            def batch_at(s, x=x, y=y, head=head):
                return {**_cycle_batch(x, y, cfg.few_shot_batch, s, seed), "head": head}

            res = atlas.fit(
                objective,
                pool.pretrained,
                taus,
                batch_at,
                epochs=1,
                steps_per_epoch=_cap(cfg, cfg.few_shot_steps),
                optimizer=tx,
                seed=seed,
            )
            theta = _compose(pool.pretrained, taus, res.coefficients, spec)
            row = out.setdefault(f"k={k}", {"aTLAS": [], "linear probe": [], "task arithmetic": []})
            row["aTLAS"].append(accuracy(theta, head, task, "test"))
            probe = _linear_probe(pool, head, x, y, cfg, accuracy)
            row["linear probe"].append(accuracy(pool.pretrained, probe, task, "test"))
            row["task arithmetic"].append(ta[k])
    return out


def _ta_few_shot(pool, cfg, taus, head, task, shots, accuracy) -> dict[int, float]:
    """Task arithmetic of the other tasks' vectors, λ tuned on each k-shot set itself.

    The merge of a λ does not depend on k: it is built once and scores every k-shot set in
    one encoding pass; each k then takes its own best λ.
    """
    grid, ks = _grid(cfg, cfg.few_shot_lambda_grid), list(shots)
    scores = {
        lam: accuracy.many(
            _task_arithmetic(pool.pretrained, taus, lam), [(head, *shots[k]) for k in ks]
        )
        for lam in grid
    }
    test: dict[float, float] = {}
    out = {}
    for j, k in enumerate(ks):
        lam, _ = select_scale(lambda v, j=j: scores[v][j], grid)
        if lam not in test:
            test[lam] = accuracy(_task_arithmetic(pool.pretrained, taus, lam), head, task, "test")
        out[k] = test[lam]
    return out


def _linear_probe(pool: Pool, head, x, y, cfg: Config, accuracy):
    """A linear head trained on θ0's features of the k-shot set, from the frozen head.

    The features are padded to a fixed number of rows with zero-weight rows: one compilation.
    """
    key = (id(pool), "probe")
    if key not in _CACHE:
        tx = optax.adamw(cfg.probe_lr, weight_decay=0.01)

        @jax.jit
        def run(head, feats, y, w):
            def loss(h):
                logits = pool.head_apply(h, feats)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                return jnp.sum(ce * w) / jnp.sum(w)

            def body(carry, _):
                h, opt = carry
                upd, opt = tx.update(jax.grad(loss)(h), opt, h)
                return (optax.apply_updates(h, upd), opt), None

            return jax.lax.scan(body, (head, tx.init(head)), None, length=cfg.probe_steps)[0][0]

        _CACHE[key] = run
    size = max(cfg.shots) * max(t.num_classes for t in pool.tasks)
    n = len(y)
    feats = accuracy.features(pool.pretrained, x)
    feats = np.concatenate([feats, np.zeros((size - n, *feats.shape[1:]), feats.dtype)])
    yp = np.concatenate([y, np.zeros(size - n, y.dtype)])
    return _CACHE[key](head, feats, yp, (np.arange(size) < n).astype(np.float32))


def run_tta(pool: Pool, cfg: Config, seed: int, accuracy) -> dict:
    out: dict[str, list[float]] = {"pretrained": [], "entropy": [], "pseudo-label": []}
    ent = _objective(pool, "entropy")
    pl = _objective(pool, "pseudo_label", cfg.tta_threshold)
    tx = _optimizer("tta", cfg.tta_lr)
    spec = atlas.blocks(pool.pretrained)
    for h, task in enumerate(pool.tasks):
        taus = _others(pool, h)
        head = pool.heads[h]
        x_test = task.x_test
        out["pretrained"].append(accuracy(pool.pretrained, head, task, "test"))
        steps = _cap(cfg, len(x_test) // cfg.tta_batch)
        for name, objective in (("entropy", ent), ("pseudo-label", pl)):

            def batch_at(s, x_test=x_test, head=head, name=name):
                b = _cycle_batch(x_test, None, cfg.tta_batch, s, seed)
                if name == "entropy":
                    return {"x": b["x"], "head": head}
                rng = np.random.default_rng([seed, s, 7])
                return {"weak": b["x"], "strong": _strong_view(b["x"], rng), "head": head}

            # No labels anywhere: no evaluate, so fit keeps the last of the fixed
            # tta_epochs (a user adapting at test time has no labelled split to choose by).
            res = atlas.fit(
                objective,
                pool.pretrained,
                taus,
                batch_at,
                epochs=cfg.tta_epochs,
                steps_per_epoch=steps,
                optimizer=tx,
                seed=seed,
            )
            theta = _compose(pool.pretrained, taus, res.coefficients, spec)
            out[name].append(accuracy(theta, head, task, "test"))
    return out


# Objectives and optimisers are built once, so that fit's compiled steps are reused; the
# task's frozen head travels in the batch.
_CACHE: dict = {}


def _objective(pool: Pool, kind: str, arg: Any = None):
    key = (id(pool), kind, arg)
    if key not in _CACHE:
        logits = lambda p, b: pool.head_apply(b["head"], pool.encode(p, b["x"]))
        _CACHE[key] = {
            "addition": lambda: atlas.task_addition_objective([logits] * (arg or 1)),
            "negation": lambda: atlas.task_negation_objective(logits, logits),
            "supervised": lambda: atlas.supervised_objective(logits),
            "entropy": lambda: atlas.entropy_objective(logits),
            "pseudo_label": lambda: atlas.pseudo_label_objective(logits, threshold=arg),
        }[kind]()
    return _CACHE[key]


def _optimizer(name: str, lr: float, total: int | None = None):
    key = ("tx", name, lr, total)
    if key not in _CACHE:
        _CACHE[key] = atlas.few_shot_optimizer(total, lr) if total else atlas.default_optimizer(lr)
    return _CACHE[key]
