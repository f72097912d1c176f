"""Domain upsampling at the end of training: domain accuracy against general accuracy.

Blakeney et al. ("Does your data spark joy? Performance gains from domain upsampling at the
end of training", 2024) train on a general mixture and, for the last fraction ``f`` of the
steps, raise the share of the domain data (math, code); the domain benchmarks gain most of
what a domain-heavy mixture gives, and the general ones lose little while ``f`` stays small
(they settle on about 20 %). This module asks the same question on
:func:`cljax.data.embedded_benchmark`: several tasks are the "general" data, one task (few
examples, a small natural share) is the "domain". One MLP on pixels (``hidden`` wide, one
output block per task; each task's loss and accuracy use its own block) is trained for
``steps`` steps on :class:`cljax.data.MixedBatcher` batches whose weights follow
:func:`cljax.data.mixture_schedule`:

- steps ``[0, (1 - f) steps)``: the natural mixture, every task in proportion to its training
  set (the domain's share is ``domain_size / total``);
- steps ``[(1 - f) steps, steps)``: the domain at ``upsample_weight`` of each batch, the
  general tasks sharing the rest in their natural proportions.

All values of ``f`` and all seeds share one compiled training run (vmapped; the batches are
drawn by the batcher on the host as row indices, then gathered inside a ``lax.scan``).

Command::

    python -m experiments.mixtures                 # the default preset: f in 0/5/10/20/30 %
    python -m experiments.mixtures --preset tiny   # smoke test

Expected result: ``docs/results/mixtures.md`` (the measured table and what it means).

Outputs under ``--out`` (default ``runs/mixtures``): ``results.json`` and a printed table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.data import MixedBatcher, Task, embedded_benchmark, mixture_schedule
from experiments import _common as C


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    general: tuple[str, ...] = ("mnist", "signs", "shapes")
    domain: str = "digits"
    fractions: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    general_size: int = 1000
    domain_size: int = 100
    test_size: int = 400
    upsample_weight: float = 0.5
    hidden: int = 128
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    data_seed: int = 0
    out: str = "runs/mixtures"


PRESETS = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        general=("mnist",),
        fractions=(0.0, 0.3),
        seeds=(0,),
        general_size=300,
        domain_size=60,
        test_size=150,
        hidden=64,
        steps=300,
        out="runs/mixtures-tiny",
    ),
}

HELP = {
    "preset": f"embedded preset to start from: {', '.join(PRESETS)}",
    "general": "benchmark tasks that make up the general data",
    "domain": "the benchmark task that is the domain data",
    "fractions": "fractions f of the steps, at the end, with the domain upsampled",
    "seeds": "seeds: each draws its own initial parameters and batches",
    "general_size": "training examples of each general task",
    "domain_size": "training examples of the domain task (its natural share follows from it)",
    "test_size": "test examples per task",
    "upsample_weight": "share of the domain in each batch while upsampled",
    "hidden": "width of the MLP's two hidden layers",
    "steps": "Adam steps in all (the same for every f)",
    "batch_size": "examples per step",
    "learning_rate": "Adam learning rate",
    "data_seed": "seed of the benchmark's images and splits",
    "out": "output folder for results.json",
}


def schedule_for(f: float, steps: int, natural: np.ndarray, upsample_weight: float):
    """The mixture schedule: natural weights, then the domain (last entry) upsampled."""
    up = natural[:-1] / natural[:-1].sum() * (1.0 - upsample_weight)
    up = np.append(up, upsample_weight)
    switch = int(round((1.0 - f) * steps))
    if switch >= steps:
        return mixture_schedule({0: natural.tolist()})
    if switch == 0:
        return mixture_schedule({0: up.tolist()})
    return mixture_schedule({0: natural.tolist(), switch: up.tolist()})


def run(cfg: Config) -> dict:
    if cfg.domain in cfg.general:
        raise ValueError(f"domain={cfg.domain!r} is also among general={cfg.general}")
    for f in cfg.fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"fractions: {f} must be in [0, 1]")
    if not 0.0 < cfg.upsample_weight < 1.0:
        raise ValueError(f"upsample_weight={cfg.upsample_weight} must be in (0, 1)")
    names = (*cfg.general, cfg.domain)
    bench = embedded_benchmark(
        cfg.data_seed,
        tasks=names,
        train_size=max(cfg.general_size, cfg.domain_size),
        val_size=1,
        test_size=cfg.test_size,
    )
    prep = lambda x: np.asarray(x, np.float32).reshape(len(x), -1) / 255.0  # noqa: E731
    sizes = [cfg.general_size] * len(cfg.general) + [cfg.domain_size]
    xs, ys, tests, offsets, n_classes = [], [], [], [], []
    for task, n in zip(bench.tasks, sizes, strict=True):
        offsets.append(sum(n_classes))
        n_classes.append(len(task.classes))
        xs.append(prep(task.x_train[:n]))
        ys.append(task.y_train[:n].astype(np.int32))
        tests.append((prep(task.x_test), task.y_test.astype(np.int32)))
    rows_of = np.cumsum([0] + [len(y) for y in ys])
    x_all, y_all = jnp.asarray(np.concatenate(xs)), jnp.asarray(np.concatenate(ys))
    task_of = jnp.asarray(np.repeat(np.arange(len(names)), [len(y) for y in ys]))
    natural = np.asarray(sizes, np.float64) / sum(sizes)
    total = sum(n_classes)
    # block mask: [tasks, total classes], True on each task's own outputs
    mask = np.zeros((len(names), total), bool)
    for t, (o, k) in enumerate(zip(offsets, n_classes, strict=True)):
        mask[t, o : o + k] = True
    mask = jnp.asarray(mask)
    off = jnp.asarray(offsets, jnp.int32)

    # host side: every run's batches as global row indices (the batcher over index "tasks")
    runs = [(f, s) for f in cfg.fractions for s in cfg.seeds]
    index_tasks = [
        Task(
            n,
            ("-",),
            (rows_of[t] + np.arange(len(ys[t])))[:, None].astype(np.int64),
            np.zeros(len(ys[t]), np.int32),
            *([np.zeros((1, 1), np.int64), np.zeros(1, np.int32)] * 2),
        )
        for t, n in enumerate(names)
    ]
    idx = np.empty((len(runs), cfg.steps, cfg.batch_size), np.int32)
    domain_seen = []
    for r, (f, s) in enumerate(C.progress(runs, "batches")):
        b = MixedBatcher(
            tuple(index_tasks),
            cfg.batch_size,
            schedule_for(f, cfg.steps, natural, cfg.upsample_weight),
            seed=s,
        )
        for step in range(cfg.steps):
            idx[r, step] = b.batch_at(step)["x"][:, 0]
        domain_seen.append(int(np.sum(idx[r] >= rows_of[-2])))

    dims = (x_all.shape[1], cfg.hidden, cfg.hidden, total)
    tx = optax.adam(cfg.learning_rate)

    def init(seed):
        keys = jax.random.split(jax.random.key(seed), 3)
        return [
            {"w": jnp.sqrt(2.0 / a) * jax.random.normal(k, (a, b)), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, dims[:-1], dims[1:], strict=True)
        ]

    def logits_fn(p, x):
        for layer in p[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ p[-1]["w"] + p[-1]["b"]

    def loss_fn(p, rows):
        t = task_of[rows]
        z = jnp.where(mask[t], logits_fn(p, x_all[rows]), -jnp.inf)
        return optax.softmax_cross_entropy_with_integer_labels(z, y_all[rows] + off[t]).mean()

    def train(p, batches):
        def step(carry, rows):
            p, opt = carry
            upd, opt = tx.update(jax.grad(loss_fn)(p, rows), opt, p)
            return (optax.apply_updates(p, upd), opt), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), batches)
        return p

    params = jax.tree.map(lambda *a: jnp.stack(a), *[init(s) for f, s in runs])
    params = jax.jit(jax.vmap(train))(params, jnp.asarray(idx))

    def acc(p, x, y, t):
        z = jnp.where(mask[t], logits_fn(p, x), -jnp.inf)
        return 100.0 * jnp.mean(jnp.argmax(z, -1) == y + off[t])

    acc_all = jax.jit(jax.vmap(acc, in_axes=(0, None, None, None)))
    per_task = np.stack(
        [np.asarray(acc_all(params, x, y, t)) for t, (x, y) in enumerate(tests)],
        axis=1,
    )  # [runs, tasks]
    per_run = [
        {
            "fraction": f,
            "seed": s,
            "per_task": dict(zip(names, per_task[r].tolist(), strict=True)),
            "domain": float(per_task[r, -1]),
            "general": float(per_task[r, :-1].mean()),
            "domain_examples_seen": domain_seen[r],
        }
        for r, (f, s) in enumerate(runs)
    ]
    table = []
    for f in cfg.fractions:
        rs = [r for r in per_run if r["fraction"] == f]
        row = {"f (%)": f"{100 * f:g}"}
        for key, label in (("domain", f"domain {cfg.domain} (%)"), ("general", "general (%)")):
            mu, sd = C.mean_std([r[key] for r in rs])
            row[label] = f"{mu:.1f} ± {sd:.1f}"
            row[f"_{key}"] = mu
        row["domain examples seen"] = f"{np.mean([r['domain_examples_seen'] for r in rs]):.0f}"
        table.append(row)
    return {
        "config": dataclasses.asdict(cfg),
        "natural_weights": dict(zip(names, natural.tolist(), strict=True)),
        "per_run": per_run,
        "rows": table,
    }


def main(argv=None) -> dict:
    cfg, results = C.run_from_flags(
        run, Config, PRESETS, argv, description=__doc__.split("\n")[0], help=HELP
    )
    if C.is_primary():
        cols = [c for c in results["rows"][0] if not c.startswith("_")]
        share = results["natural_weights"][cfg.domain]
        print(
            f"\n### Domain {cfg.domain} ({100 * share:.1f} % natural share, "
            f"{100 * cfg.upsample_weight:g} % when upsampled) vs general {list(cfg.general)}: "
            f"test accuracy, mean ± std over seeds {list(cfg.seeds)}\n"
        )
        print(C.format_table(results["rows"], cols))
        C.write_json(Path(cfg.out) / "results.json", results)
        print(f"\n{results['seconds']:.0f} s ({results['cpu_seconds']:.0f} s CPU); in {cfg.out}")
    return results


if __name__ == "__main__":
    main()
