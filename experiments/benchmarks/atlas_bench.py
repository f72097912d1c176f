"""One aTLAS training step against one plain fine-tuning step of the same model.

Command::

    python -m experiments.benchmarks.atlas_bench               # small ViT and ViT-B/32 shape
    python -m experiments.benchmarks.atlas_bench --small-only  # seconds

Each step is jitted with its state donated and timed by its median over repeats:

* ``fine-tune``: forward, backward and an AdamW update of all parameters (the baseline);
* ``aTLAS``: compose θ = θ0 + Σ_t Λ_t τ_t (block-wise, T task vectors), forward, backward,
  the coefficient gradient <dL/dθ_b, τ_t,b> of :func:`cljax.merging.atlas.compose`'s custom
  VJP, and an AdamW update of Λ;
* ``aTLAS (3 programs)``: the same step as three jitted calls, compose → the model's
  forward and backward at θ → the coefficient gradient (the VJP of ``compose``) and the
  update; bit-identical coefficients. On XLA:CPU the one-program step costs more than its
  parts (the same fusions take more CPU time in one program), and splitting recovers most
  of it;
  peak memory is that of the largest of the three programs plus the composed θ;
* ``aTLAS (autodiff)``: the same step through a naive composition written with plain ``jnp``
  (``θ0 + Σ_t Λ_t τ_t`` summed over a stacked axis), differentiated by JAX: the reference
  point for the custom VJP.

Peak memory is XLA's static estimate of the compiled step (``memory_analysis``: arguments +
outputs + temporaries − aliased donations), which is what the device must hold. Expected on
the 2-core CPU: the aTLAS step within about 1.3× the fine-tuning step for ViT-B/32 at batch
8 with T = 8 (two extra passes over the T stored task vectors against a forward and
backward pass), and memory = model + T task vectors + one set of activations. Runtime:
about a minute for ``--small-only``, a few minutes with ViT-B/32 (8 task vectors of 88M
parameters: 2.8 GB in float32, 1.4 GB in bfloat16).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.merging import atlas
from cljax.models import ViT
from cljax.tree import leaves_with_paths, map_with_path
from experiments._common import (
    compiled_memory_mib,
    format_table,
    median_time,
    random_task_vectors,
    write_json,
)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    patch_size: int
    hidden_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    image: int
    channels: int
    num_classes: int


SMALL = Shape("small ViT", 7, 64, 2, 4, 128, 28, 1, 10)
B32 = Shape("ViT-B/32 shape", 32, 768, 12, 12, 3072, 224, 3, 10)


def bench(
    shape: Shape,
    *,
    batch: int,
    num_tasks: int,
    tv_dtype,
    repeats: int,
    seed: int = 0,
    autodiff: bool = True,
):
    model = ViT(
        patch_size=shape.patch_size,
        hidden_dim=shape.hidden_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        mlp_dim=shape.mlp_dim,
        num_classes=shape.num_classes,
    )
    x = jnp.asarray(
        np.random.default_rng(seed).random(
            (batch, shape.image, shape.image, shape.channels), np.float32
        )
    )
    y = jnp.asarray(np.arange(batch) % shape.num_classes)
    params = model.init(jax.random.key(seed), x[:1])
    n_params = sum(p.size for p in jax.tree.leaves(params))

    def loss(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # Task vectors on the encoder only; the head stays frozen (the reference's setting).
    tvs = random_task_vectors(params, num_tasks, jax.random.key(seed + 1), dtype=tv_dtype)
    spec = atlas.blocks(params, exclude=[r"/head/"])
    coefs = atlas.init(params, tvs, spec)
    tx = atlas.default_optimizer()

    # --- plain fine-tuning
    def ft_step(p, opt, x, y):
        val, g = jax.value_and_grad(loss)(p, x, y)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, val

    # --- aTLAS, custom VJP
    def atlas_step(c, opt, theta0, taus, x, y):
        val, g = jax.value_and_grad(lambda c: loss(atlas.compose(theta0, taus, c, spec), x, y))(c)
        upd, opt = tx.update(g, opt, c)
        return optax.apply_updates(c, upd), opt, val

    # --- aTLAS, autodiff through a naive composition
    flat_names = dict(zip(spec.paths, spec.block_of, strict=True))

    def naive_compose(theta0, taus, c):
        cflat = dict(leaves_with_paths(c))

        def one(path, x, tau):
            b = flat_names[path]
            if b < 0:
                return x
            lam = cflat[spec.names[b]].reshape((-1,) + (1,) * x.ndim)
            return (x + jnp.sum(lam * tau.astype(jnp.float32), axis=0)).astype(x.dtype)

        return map_with_path(one, theta0, taus)

    def naive_step(c, opt, theta0, taus, x, y):
        val, g = jax.value_and_grad(lambda c: loss(naive_compose(theta0, taus, c), x, y))(c)
        upd, opt = tx.update(g, opt, c)
        return optax.apply_updates(c, upd), opt, val

    # --- aTLAS as three programs (same arithmetic, no cross-program fusion)
    compose_fn = jax.jit(lambda theta0, taus, c: atlas.compose(theta0, taus, c, spec))
    model_grad = jax.jit(jax.value_and_grad(loss))

    def coef_update(c, opt, theta0, taus, g):
        _, vjp = jax.vjp(lambda c: atlas.compose(theta0, taus, c, spec), c)
        (gc,) = vjp(g)
        upd, opt = tx.update(gc, opt, c)
        return optax.apply_updates(c, upd), opt

    coef_update = jax.jit(coef_update, donate_argnums=(0, 1))

    rows = []
    results = {}
    variants = {
        "fine-tune": (ft_step, lambda: (params, tx.init(params), x, y)),
        "aTLAS": (atlas_step, lambda: (coefs, tx.init(coefs), params, tvs, x, y)),
        "aTLAS (autodiff)": (naive_step, lambda: (coefs, tx.init(coefs), params, tvs, x, y)),
    }
    if not autodiff:
        variants.pop("aTLAS (autodiff)")
    reps = repeats if n_params > 1_000_000 else max(repeats, 100)
    for name, (fn, make_args) in variants.items():
        jitted = jax.jit(fn, donate_argnums=(0, 1))
        args = make_args()
        # Copies so that donation does not consume the shared arrays.
        args = (jax.tree.map(jnp.copy, args[0]), jax.tree.map(jnp.copy, args[1]), *args[2:])
        compiled = jitted.lower(*args).compile()
        mem = compiled_memory_mib(compiled)
        state = {"a": args}

        def run(compiled=compiled, state=state):
            a = state["a"]
            out = compiled(*a)
            jax.block_until_ready(out)
            state["a"] = (out[0], out[1], *a[2:])

        # A millisecond step is at the mercy of the scheduler: many more repeats for it.
        t = median_time(run, warmup=1, repeats=reps)
        results[name] = {"time_s": t, "memory_mib": mem}
        if name != "aTLAS":
            continue
        # Right after the one-program step, the same step as three programs.
        c3, o3 = jax.tree.map(jnp.copy, coefs), tx.init(coefs)
        box = {"c": c3, "o": o3}

        def run3(box=box):
            theta = compose_fn(params, tvs, box["c"])
            val, g = model_grad(theta, x, y)
            box["c"], box["o"] = coef_update(box["c"], box["o"], params, tvs, g)
            jax.block_until_ready((val, box["c"]))

        theta_mib = sum(leaf.nbytes for leaf in jax.tree.leaves(params)) / 2**20
        mems = [
            compiled_memory_mib(compose_fn.lower(params, tvs, c3).compile()),
            compiled_memory_mib(model_grad.lower(params, x, y).compile()),
            compiled_memory_mib(coef_update.lower(c3, o3, params, tvs, params).compile()),
        ]
        mem3 = None if None in mems else max(mems) + theta_mib
        t3 = median_time(run3, warmup=1, repeats=reps)
        results["aTLAS (3 programs)"] = {"time_s": t3, "memory_mib": mem3}
    base = results["fine-tune"]["time_s"]
    tv_mib = sum(leaf.nbytes for leaf in jax.tree.leaves(tvs)) / 2**20
    model_mib = sum(leaf.nbytes for leaf in jax.tree.leaves(params)) / 2**20
    for name, r in results.items():
        rows.append(
            {
                "model": shape.name,
                "step": name,
                "time (ms)": 1e3 * r["time_s"],
                "× fine-tune": r["time_s"] / base,
                "peak memory (MiB)": r["memory_mib"] if r["memory_mib"] is not None else "n/a",
            }
        )
    meta = {
        "params": int(n_params),
        "coefficients": spec.num_coefficients(num_tasks),
        "blocks": spec.num_blocks,
        "model_mib": model_mib,
        "task_vectors_mib": tv_mib,
        "tv_dtype": jnp.dtype(tv_dtype).name,
        "batch": batch,
        "num_tasks": num_tasks,
    }
    return rows, {"results": results, **meta}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small-only", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num_tasks", type=int, default=8)
    parser.add_argument("--tv_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/atlas_bench")
    parser.add_argument(
        "--no_autodiff",
        action="store_true",
        help="skip the naive-autodiff reference (minutes a step at ViT-B/32 on a CPU)",
    )
    args = parser.parse_args(argv)
    shapes = [SMALL] if args.small_only else [SMALL, B32]
    rows, out = [], {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    for shape in shapes:
        r, meta = bench(
            shape,
            batch=args.batch,
            num_tasks=args.num_tasks,
            tv_dtype=jnp.dtype(args.tv_dtype),
            repeats=args.repeats,
            autodiff=not args.no_autodiff,
        )
        rows += r
        out[shape.name] = meta
        print(
            f"{shape.name}: {meta['params'] / 1e6:.2f}M params ({meta['model_mib']:.0f} MiB), "
            f"T={meta['num_tasks']} task vectors {meta['tv_dtype']} "
            f"({meta['task_vectors_mib']:.0f} MiB), {meta['blocks']} blocks, "
            f"{meta['coefficients']} coefficients",
            file=sys.stderr,
        )
    table = format_table(rows, floatfmt=".2f")
    print(table)
    out["rows"] = rows
    write_json(Path(args.out) / "results.json", out)


if __name__ == "__main__":
    main()
