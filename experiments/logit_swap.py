"""Logit-swap self-distillation against plain fine-tuning and LwF on a sequence of digit domains.

Mix-CPT's claim (Jiang et al., 2024): distilling the frozen pre-update model, with its top
logit swapped for the label's where it is wrong, learns the new data while forgetting less
than training on the labels alone. Here the "knowledge" is a first digit domain and the
continual training a sequence of further domains with the *same* label space (the digits
0-9), as in domain-incremental continual learning: MNIST-5k, then scikit-learn's digits
(upscaled 8x8 handwriting), then the benchmark's house-number strips (``svhn``), all from
:func:`cljax.data.embedded_benchmark`. One MLP (1024-``hidden``-``hidden``-10 on grey-scale
pixels) is trained on the first domain; then, from the same starting point, each method
trains it on the following domains one after the other:

- ``ce``: cross-entropy on the new domain's labels (plain sequential fine-tuning);
- ``lwf``: ``ce`` plus ``lwf_weight`` times the LwF distillation (T = ``lwf_temperature``)
  of the model as it was before the current domain (Li & Hoiem, 2017);
- ``logit_swap``: :func:`cljax.losses.logit_swap_distillation` of the model as it was before
  the current domain (T = ``swap_temperature``), *instead of* the cross-entropy: the swapped
  teacher ranks the label first, so the loss carries the label and the teacher's other logits;
- ``ce+logit_swap``: the cross-entropy plus that distillation (the paper calls the swap
  distillation a constraint added to continual pre-training; without its code, both readings
  are run).

The teacher of every domain is the model at the end of the previous one (Mix-CPT's teacher is
the model before continual pre-training; with one new domain the two coincide). Every method
sees the same batches (one key per seed and step) and the same number of steps; the seeds are
vmapped and a whole domain's training is one ``lax.scan`` under ``jit``. Reported: the
accuracy matrix (after each domain, on every domain's test set), the first domain's accuracy
at the end (retention) and the final average accuracy over all domains.

Command::

    python -m experiments.logit_swap                 # the default preset (3 domains, 3 seeds)
    python -m experiments.logit_swap --preset tiny   # smoke test

Expected result: ``docs/results/logit-swap.md`` (the measured table and what it means).

Outputs under ``--out`` (default ``runs/logit-swap``): ``results.json`` and a printed table.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import losses
from cljax.data import embedded_benchmark
from experiments import _common as C

METHODS = ("ce", "lwf", "logit_swap", "ce+logit_swap")


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    domains: tuple[str, ...] = ("mnist", "digits", "svhn")
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    train_size: int = 1000
    test_size: int = 400
    hidden: int = 256
    first_steps: int = 1500
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    swap_temperature: float = 1.0
    data_seed: int = 0
    out: str = "runs/logit-swap"


PRESETS = {
    "default": Config(),
    "tiny": Config(
        preset="tiny",
        domains=("mnist", "digits"),
        seeds=(0,),
        train_size=300,
        test_size=200,
        hidden=64,
        first_steps=300,
        steps=150,
        out="runs/logit-swap-tiny",
    ),
}

HELP = {
    "preset": f"embedded preset to start from: {', '.join(PRESETS)}",
    "domains": "digit domains of the benchmark, in training order (mnist, digits, svhn)",
    "methods": f"methods for the domains after the first: {', '.join(METHODS)}",
    "seeds": "seeds: each draws its own initial parameters and batches",
    "train_size": "training examples per domain (MNIST caps at 3,500, digits at 1,197 - val)",
    "test_size": "test examples per domain (MNIST caps at 1,000, digits at 400)",
    "hidden": "width of the MLP's two hidden layers",
    "first_steps": "Adam steps on the first domain (cross-entropy, shared by all methods)",
    "steps": "Adam steps on each later domain",
    "batch_size": "examples per step",
    "learning_rate": "Adam learning rate",
    "lwf_weight": "weight of LwF's distillation term",
    "lwf_temperature": "LwF's temperature",
    "swap_temperature": "temperature of the logit-swap distillation",
    "data_seed": "seed of the benchmark's images and splits",
    "out": "output folder for results.json",
}


def load_domains(names, *, train_size: int, test_size: int, seed: int) -> list[dict]:
    """Grey-scale ``[N, 1024]`` float32 inputs in [0, 1] and int32 labels of digit domains."""
    bench = embedded_benchmark(
        seed, tasks=tuple(names), train_size=train_size, val_size=1, test_size=test_size
    )

    def prep(x):
        return np.asarray(x, np.float32).mean(-1).reshape(len(x), -1) / 255.0

    return [
        {
            "name": t.name,
            "x": prep(t.x_train),
            "y": t.y_train.astype(np.int32),
            "x_test": prep(t.x_test),
            "y_test": t.y_test.astype(np.int32),
        }
        for t in bench.tasks
    ]


def _dense(key, n_in, n_out):
    return {
        "w": jnp.sqrt(2.0 / n_in) * jax.random.normal(key, (n_in, n_out)),
        "b": jnp.zeros(n_out),
    }


def init_mlp(key, sizes) -> list:
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def method_weights(cfg: Config, method: str) -> tuple[float, float, float]:
    """Weights of (cross-entropy, LwF distillation, logit-swap distillation) of a method."""
    if method == "ce":
        return (1.0, 0.0, 0.0)
    if method == "lwf":
        return (1.0, cfg.lwf_weight, 0.0)
    if method == "logit_swap":
        return (0.0, 0.0, 1.0)
    if method == "ce+logit_swap":
        return (1.0, 0.0, 1.0)
    raise ValueError(f"methods: {method!r} must be one of {METHODS}")


def make_train(cfg: Config):
    """``train(params, teacher, x, y, key, weights, steps) -> params``, vmapped and jitted.

    ``weights`` are a run's (CE, LwF, logit swap) weights, so every method is one vmapped
    lane of a single compiled function; ``steps`` is traced (a ``fori_loop``), so the first
    domain and the later ones share that compilation too.
    """
    tx = optax.adam(cfg.learning_rate)

    def loss_fn(p, teacher, xb, yb, w):
        logits = mlp(p, xb)
        old = mlp(teacher, xb)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        kd = losses.lwf_distillation(logits, old, temperature=cfg.lwf_temperature)
        swap = losses.logit_swap_distillation(logits, old, yb, temperature=cfg.swap_temperature)
        return w[0] * ce + w[1] * kd + w[2] * swap

    def one(p, teacher, x, y, key, w, steps):
        def step(s, carry):
            p, opt = carry
            i = jax.random.randint(jax.random.fold_in(key, s), (cfg.batch_size,), 0, x.shape[0])
            g = jax.grad(loss_fn)(p, teacher, x[i], y[i], w)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt

        p, _ = jax.lax.fori_loop(0, steps, step, (p, tx.init(p)))
        return p

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, 0, 0, None)))


@jax.jit
@functools.partial(jax.vmap, in_axes=(0, None, None))
def _accuracy(params, x, y):
    return 100.0 * jnp.mean(jnp.argmax(mlp(params, x), -1) == y)


def accuracies(params, domains) -> np.ndarray:
    """``[runs, domains]`` test accuracy (%) of stacked parameters."""
    return np.stack(
        [np.asarray(_accuracy(params, d["x_test"], d["y_test"])) for d in domains], axis=1
    )


def run(cfg: Config) -> dict:
    if len(cfg.domains) < 2:
        raise ValueError(f"domains={cfg.domains} needs at least two domains")
    weights = jnp.asarray([method_weights(cfg, m) for m in cfg.methods for _ in cfg.seeds])
    domains = load_domains(
        cfg.domains, train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.data_seed
    )
    sizes = (domains[0]["x"].shape[1], cfg.hidden, cfg.hidden, 10)
    n_seeds, n_methods = len(cfg.seeds), len(cfg.methods)
    init = jax.tree.map(
        lambda *a: jnp.stack(a), *[init_mlp(jax.random.key(s), sizes) for s in cfg.seeds]
    )
    # one key per seed and domain: every method sees the same batches
    keys = lambda t, reps: jnp.stack(  # noqa: E731
        [jax.random.fold_in(jax.random.key(s), t) for _ in range(reps) for s in cfg.seeds]
    )
    # the first domain: cross-entropy in every lane (the lanes of one seed stay identical)
    train = make_train(cfg)
    tile = lambda a: jnp.tile(a, (n_methods,) + (1,) * (a.ndim - 1))  # noqa: E731
    p = jax.tree.map(tile, init)
    ce_only = jnp.tile(jnp.asarray([[1.0, 0.0, 0.0]]), (n_methods * n_seeds, 1))
    x, y = domains[0]["x"], domains[0]["y"]
    p = train(p, p, x, y, keys(0, n_methods), ce_only, cfg.first_steps)
    rows = [accuracies(p, domains)]
    after_first = rows[0][:n_seeds]  # [seeds, domains]
    for t in C.progress(range(1, len(domains)), "domains"):
        x, y = domains[t]["x"], domains[t]["y"]
        p = train(p, p, x, y, keys(t, n_methods), weights, cfg.steps)
        rows.append(accuracies(p, domains))
    mats = np.stack(rows, axis=1).reshape(n_methods, n_seeds, len(domains), len(domains))
    matrices = dict(zip(cfg.methods, mats, strict=True))  # [seeds, after task, on domain]
    table = []
    names = [d["name"] for d in domains]
    for method in cfg.methods:
        m = matrices[method]
        final = m[:, -1]  # after the last domain
        row = {"method": method}
        for j, name in enumerate(names):
            mu, sd = C.mean_std(final[:, j].tolist())
            row[f"{name} (%)"] = f"{mu:.1f} ± {sd:.1f}"
            row[f"_{name}"] = mu
        mu, sd = C.mean_std(final.mean(1).tolist())
        row["average (%)"] = f"{mu:.1f} ± {sd:.1f}"
        row["_average"] = mu
        table.append(row)
    return {
        "config": dataclasses.asdict(cfg),
        "domains": names,
        "after_first": after_first.tolist(),
        "matrices": {k: v.tolist() for k, v in matrices.items()},
        "rows": table,
    }


def main(argv=None) -> dict:
    cfg, results = C.run_from_flags(
        run, Config, PRESETS, argv, description=__doc__.split("\n")[0], help=HELP
    )
    if C.is_primary():
        cols = [c for c in results["rows"][0] if not c.startswith("_")]
        print(
            f"\n### After training on {' -> '.join(results['domains'])} (test accuracy, mean ± "
            f"std over seeds {list(cfg.seeds)})\n"
        )
        print(C.format_table(results["rows"], cols))
        C.write_json(Path(cfg.out) / "results.json", results)
        print(f"\n{results['seconds']:.0f} s ({results['cpu_seconds']:.0f} s CPU); in {cfg.out}")
    return results


if __name__ == "__main__":
    main()
