"""Communication per step of cljax methods: the compiled HLO against the analytic model.

Command::

    python -m experiments.benchmarks.comm_bench             # N = 2, 4, 8 simulated devices
    python -m experiments.benchmarks.comm_bench --sizes 2 4 --project_only

For each method and sharding mode (data parallel ``dp``: params replicated, batch split;
``fsdp``: params, optimizer and method states sharded by the FSDP rule, batch split; ``task``:
stacked task vectors split on their task axis) it compiles the jitted step on N simulated
CPU devices, reads the collectives from the compiled HLO (:func:`cljax.sharding.
hlo_collectives`) and prints the bytes each device sends with ring algorithms, next to the
analytic model of ``docs/scaling.md``. A second table projects the model to ViT-L/14
(304M parameters) on 8 to 256 chips. Runtime: about a minute on a 2-core CPU (compiles only;
nothing is timed). Expected: measured/predicted near 1 for the parameter-sized terms; the
small terms (losses, norms, coefficient gradients) are what the ratio's excess holds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

VIT_L14_PARAMS = 303_966_208  # CLIP ViT-L/14 image encoder
VIT_L14_BLOCKS = 24 * 12 + 8  # aTLAS blocks: one per tensor (roughly)


def predicted_bytes(
    method: str,
    mode: str,
    n: int,
    p_bytes: float,
    t: int,
    extra: float = 0.0,
    *,
    reduce_scatter: bool = True,
) -> float:
    """Per-device bytes sent per step (ring algorithms), the model of docs/scaling.md.

    Args:
      method, mode: the row.
      n: devices.
      p_bytes: bytes of the parameters (float32).
      t: tasks (per-task gradients).
      extra: bytes of the small replicated gradient a method reduces (aTLAS coefficients).
      reduce_scatter: whether a sharded gradient is reduced by a reduce-scatter (TPU and
        GPU: ``(n-1)/n`` of it) or, as XLA:CPU compiles it, by an all-reduce and a slice
        (``2 (n-1)/n``).
    """
    r = (n - 1) / n
    rs = (lambda x: r * x) if reduce_scatter else (lambda x: 2 * r * x)
    table = {
        ("train", "dp"): 2 * r * p_bytes,
        ("train", "fsdp"): r * p_bytes + rs(p_bytes),
        ("ema", "dp"): 2 * r * p_bytes,
        ("ema", "fsdp"): r * p_bytes + rs(p_bytes),
        ("gpm", "dp"): 2 * r * p_bytes,
        ("gpm", "fsdp"): r * p_bytes + rs(p_bytes),  # memories replicated
        ("per_task_grads", "dp"): 2 * r * t * p_bytes,
        ("per_task_grads", "fsdp"): r * p_bytes + rs(t * p_bytes),
        ("task_arithmetic", "fsdp"): 0.0,
        ("task_arithmetic", "task"): r * p_bytes,
        ("ties", "fsdp"): 0.0,  # plus the threshold search's counts
        ("ties", "task"): r * p_bytes,
        ("atlas_step", "dp"): 2 * r * p_bytes,  # plain jit reduces dL/dθ
        ("atlas_step", "dp_local"): 2 * r * extra,  # data_parallel_value_and_grad
        ("atlas_step", "fsdp"): r * p_bytes + rs(p_bytes) + 2 * r * extra,
    }
    return table[(method, mode)]


def _problems(n: int, t: int):
    """``[(method, mode, compiled, param_bytes, extra_bytes)]`` on an n-device mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from cljax import averaging, merging, projection
    from cljax import sharding as cs
    from cljax import tree as ct
    from cljax.merging import atlas
    from cljax.train import TrainState, make_step

    mesh = cs.make_mesh({"data": n}, jax.devices()[:n])
    r = np.random.default_rng(0)
    dims = [(256, 512), (512, 512), (512, 256)]
    params = {
        f"l{i}": {"kernel": jnp.asarray(r.normal(size=s) / 20, jnp.float32)}
        for i, s in enumerate(dims)
    }
    p_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
    batch = {
        "x": jnp.asarray(r.normal(size=(1024, 256)), jnp.float32),  # activations > weights
        "y": jnp.asarray(r.normal(size=(1024, 256)), jnp.float32),
    }

    def forward(p, x):
        for i in range(len(dims)):
            x = jnp.tanh(x @ p[f"l{i}"]["kernel"])
        return x

    def loss(p, b, rng=None):
        return jnp.mean((forward(p, b["x"]) - b["y"]) ** 2)

    bsh = cs.batch_sharding(mesh)
    out = []

    def step_problem(method, tx, post=None, methods=None, grad_loss=loss, rules=()):
        for mode in ("dp", "fsdp"):
            init = lambda p: TrainState.create(p, tx, 0, methods=methods(p) if methods else None)
            default = cs.FSDP if mode == "fsdp" else cs.REPLICATED
            state, sh = cs.create_sharded_state(
                init, params, mesh=mesh, rules=rules, default=default
            )
            step = cs.sharded_step(make_step(grad_loss, post_update=post, jit=False), sh, bsh)
            compiled = step.lower(state, cs.shard_batch(batch, mesh)).compile()
            out.append((method, mode, compiled, p_bytes, 0.0))

    step_problem("train", optax.sgd(0.1))
    avgs = {"ema": averaging.ema(decay=0.99)}
    step_problem(
        "ema",
        optax.sgd(0.1),
        post=averaging.averaging_hook(avgs),
        methods=lambda p: averaging.init_averages(avgs, p),
    )
    gpm_tx = optax.chain(optax.sgd(0.1), projection.gpm([(r"l[01]/kernel", True)]))
    step_problem("gpm", gpm_tx, rules=[(r"memory", None)])  # memories replicated

    def per_task_loss(p, b, rng=None):  # T task losses, equal weights, gradients per task
        def task_loss(q, i):
            return jnp.mean((forward(q, b["x"])[:, i::t] - b["y"][:, i::t]) ** 2)

        grads = [jax.grad(task_loss)(p, i) for i in range(t)]
        return loss(p, b), grads

    def per_task_step(state, b):
        _, grads = per_task_loss(state.params, b)
        g = jax.tree.map(lambda *gs: sum(gs) / t, *grads)
        return state.apply_gradients(g), {"n": jnp.zeros(())}

    for mode in ("dp", "fsdp"):
        init = lambda p: TrainState.create(p, optax.sgd(0.1), 0)
        default = cs.FSDP if mode == "fsdp" else cs.REPLICATED
        state, sh = cs.create_sharded_state(init, params, mesh=mesh, default=default)
        step = cs.sharded_step(per_task_step, sh, bsh)
        compiled = step.lower(state, cs.shard_batch(batch, mesh)).compile()
        out.append(("per_task_grads", mode, compiled, p_bytes, 0.0))

    tvs = ct.stack([jax.tree.map(lambda x, k=k: x * 0.01 * (k + 1), params) for k in range(n)])
    for mode in ("fsdp", "task"):
        psh = cs.named_shardings(params, mesh, default=cs.FSDP)
        tsh = cs.stacked_shardings(
            tvs,
            mesh,
            task_axis="data" if mode == "task" else None,
            default=cs.FSDP if mode == "fsdp" else cs.REPLICATED,
        )
        for method, fn in [
            ("task_arithmetic", lambda p, tv: merging.task_arithmetic(p, tv, 0.3)),
            ("ties", lambda p, tv: merging.ties(p, tv, density=0.2)),
        ]:
            compiled = (
                jax.jit(fn, in_shardings=(psh, tsh), out_shardings=psh).lower(params, tvs).compile()
            )
            out.append((method, mode, compiled, p_bytes, 0.0))

    tvs_t = ct.stack([jax.tree.map(lambda x, k=k: x * 0.01 * (k + 1), params) for k in range(t)])
    coefs = atlas.init(params, tvs_t)
    coef_bytes = 4 * sum(x.size for x in jax.tree.leaves(coefs))
    tx = optax.sgd(0.1)

    def atlas_step(coefs, opt_state, pre, tv, b):
        g = jax.grad(lambda c: loss(atlas.compose(pre, tv, c), b))(coefs)
        updates, opt_state = tx.update(g, opt_state, coefs)
        return optax.apply_updates(coefs, updates), opt_state

    atlas_loss = lambda c, b, pre, tv: loss(atlas.compose(pre, tv, c), b)
    dp_grad = cs.data_parallel_value_and_grad(atlas_loss, mesh)

    def atlas_step_dp_local(coefs, opt_state, pre, tv, b):
        _, g = dp_grad(coefs, b, pre, tv)
        updates, opt_state = tx.update(g, opt_state, coefs)
        return optax.apply_updates(coefs, updates), opt_state

    for method, mode, fn in [
        ("atlas_step", "dp", atlas_step),
        ("atlas_step", "dp_local", atlas_step_dp_local),
        ("atlas_step", "fsdp", atlas_step),
    ]:
        default = cs.FSDP if mode == "fsdp" else cs.REPLICATED
        psh = cs.named_shardings(params, mesh, default=default)
        tsh = cs.stacked_shardings(tvs_t, mesh, task_axis=None, default=default)
        rep = cs.replicated(mesh)
        compiled = (
            jax.jit(
                fn,
                in_shardings=(rep, rep, psh, tsh, bsh),
                out_shardings=(rep, rep),
                donate_argnums=(0, 1),
            )
            .lower(coefs, tx.init(coefs), params, tvs_t, batch)
            .compile()
        )
        out.append((method, mode, compiled, p_bytes, coef_bytes))
    return out


def measure(sizes: Sequence[int], t: int = 4) -> list[dict]:
    from cljax import sharding as cs

    rows = []
    for n in sizes:
        for method, mode, compiled, p_bytes, extra in _problems(n, t):
            colls = cs.collective_bytes(compiled)
            got = sum(colls.values())
            want = predicted_bytes(method, mode, n, p_bytes, t, extra, reduce_scatter=False)
            rows.append(
                {
                    "method": method,
                    "mode": mode,
                    "N": n,
                    "predicted KiB": want / 1024,
                    "measured KiB": got / 1024,
                    "ratio": got / want if want else (float("inf") if got else 1.0),
                    "collectives (KiB)": ", ".join(
                        f"{k} {v / 1024:.0f}" for k, v in sorted(colls.items())
                    ),
                }
            )
    return rows


NOTES = {
    ("train", "dp"): "all-reduce of the gradient",
    ("train", "fsdp"): "all-gather params + reduce-scatter grads",
    ("per_task_grads", "dp"): "T per-task gradients all-reduced",
    ("per_task_grads", "fsdp"): "gather once, reduce-scatter T gradients",
    ("atlas_step", "dp"): "plain jit: dL/dθ all-reduced",
    ("atlas_step", "dp_local"): "T x blocks coefficient gradient only",
    ("atlas_step", "fsdp"): "gather θ, reduce-scatter dL/dθ, coefficients",
    ("task_arithmetic", "task"): "one merge: all-to-all over tasks",
    ("ties", "task"): "one merge: all-to-all + counts",
}


def project(chips: Sequence[int] = (8, 16, 32, 64, 128, 256), t: int = 8) -> list[dict]:
    """Per-chip GB per step for ViT-L/14 (float32; bfloat16 gradients halve them)."""
    p = 4 * VIT_L14_PARAMS
    coef = 4 * t * VIT_L14_BLOCKS
    rows = []
    for method, mode in [
        ("train", "dp"),
        ("train", "fsdp"),
        ("per_task_grads", "dp"),
        ("per_task_grads", "fsdp"),
        ("atlas_step", "dp"),
        ("atlas_step", "dp_local"),
        ("atlas_step", "fsdp"),
        ("task_arithmetic", "task"),
        ("ties", "task"),
    ]:
        row = {"method": method, "mode": mode}
        for n in chips:
            row[f"{n} chips (GB)"] = predicted_bytes(method, mode, n, p, t, coef) / 1e9
        row["note"] = NOTES.get((method, mode), "")
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--project_only", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "")
    if "device_count" not in os.environ["XLA_FLAGS"]:
        import jax

        jax.config.update("jax_num_cpu_devices", max(a.sizes))
    sys.path.insert(0, str(os.getcwd()))
    from experiments._common import format_table

    if not a.project_only:
        print("## Measured on simulated CPU devices (bytes sent per device per step)\n")
        print(format_table(measure(a.sizes, a.tasks), floatfmt=".2f"))
    print("\n## Projected for ViT-L/14 (304M parameters, float32, reduce-scatter), T = 8\n")
    print(format_table(project(t=8), floatfmt=".3f"))


if __name__ == "__main__":
    main()
