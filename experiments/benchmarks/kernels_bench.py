"""Memory-roofline benchmark of the weight-space kernels (``cljax.kernels``).

For each op (``weighted_sum``, ``block_dots``, ``ties``), model size and number of task
vectors T, it reports the bytes the op must move, the median time after warm-up, the achieved
GB/s, and that bandwidth as a fraction of the copy bandwidth measured in the same run
(``y = x + 1`` on an array as large as the stacked task vectors: read + write). The XLA
reference and the Pallas kernel run on the same device; ``speedup`` is XLA time / Pallas time.
``--implementations merging`` adds the XLA code of ``cljax.merging`` (``task_arithmetic``, and
``ties`` with its bracket-search threshold) for comparison.

Shapes are those of the CLIP image encoders (open_clip layout: packed qkv): ViT-B/32
(87.8M parameters) and ViT-L/14 (303.2M); ``--layers`` keeps only the first residual blocks
to shrink them for a CPU. θ0 is float32, task vectors bfloat16 (aTLAS stores them in half
precision), coefficients per leaf (aTLAS block-wise).

Bytes counted per op (N parameters, T task vectors, bf16 τ = 2 bytes, f32 θ = 4 bytes):
  weighted_sum: read θ0 and τ, write θ:          4N + 2TN + 4N
  block_dots:   read g and τ (output is tiny):   4N + 2TN
  ties:         a lower bound: two passes over τ (the threshold must be known before
                anything is trimmed), θ0 read, θ written: 2·2TN + 4N + 4N. The kernels
                make more passes (``cljax/kernels/_ties_merge.py``), so its fraction of
                the copy bandwidth is a fraction of this two-pass ideal.

Commands:
  python -m experiments.benchmarks.kernels_bench                       # CPU preset (XLA)
  python -m experiments.benchmarks.kernels_bench --preset tiny         # seconds, smoke test
  python -m experiments.benchmarks.kernels_bench --preset gpu          # H100/H200: full sizes

Expected: the CPU preset (1 residual block of each encoder, T = 8 and 20, XLA only) takes
a few minutes on an idle 2-core machine. On the CPU, ``weighted_sum`` comes near the copy
bandwidth while ``block_dots`` and ``ties`` stay far below it (XLA:CPU's per-task
reductions and its serial scatter-add). On an H100/H200 the targets are Pallas >= 0.8 of the
copy bandwidth for every op and >= 1.3x XLA for ``block_dots`` and ``ties``; compilation
takes most of a GPU run (seconds per multi-leaf kernel). ``docs/results/kernels.md`` holds
the measured tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cljax import kernels
from experiments import _common

_MODELS = {  # width, layers, patch, tokens, mlp, output dim
    "vit-b32": (768, 12, 32, 50, 3072, 512),
    "vit-l14": (1024, 24, 14, 257, 4096, 768),
}


@dataclasses.dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("vit-b32", "vit-l14")
    tasks: tuple[int, ...] = (8, 20)
    layers: int = 1  # residual blocks kept (0: all); the CPU preset shrinks the encoders
    implementations: tuple[str, ...] = ("xla",)
    ops: tuple[str, ...] = ("weighted_sum", "block_dots", "ties")
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    out: str = "runs/kernels_bench"


PRESETS = {
    "default": Config(),
    "tiny": Config(models=("vit-b32",), tasks=(2,), layers=1, repeats=2),
    "gpu": Config(layers=0, implementations=("xla", "pallas", "merging"), warmup=2, repeats=10),
}


def vit_shapes(model: str, layers: int = 0) -> dict[str, tuple[int, ...]]:
    """Leaf shapes of a CLIP vision encoder (open_clip layout), ``layers`` blocks (0: all)."""
    width, depth, patch, tokens, mlp, out_dim = _MODELS[model]
    depth = depth if layers <= 0 else min(layers, depth)
    shapes = {
        "conv1": (patch, patch, 3, width),
        "class_embedding": (width,),
        "positional_embedding": (tokens, width),
        "ln_pre/scale": (width,),
        "ln_pre/bias": (width,),
        "ln_post/scale": (width,),
        "ln_post/bias": (width,),
        "proj": (width, out_dim),
    }
    for i in range(depth):
        p = f"block{i}/"
        shapes |= {
            p + "ln_1/scale": (width,),
            p + "ln_1/bias": (width,),
            p + "attn/in_proj/kernel": (width, 3 * width),
            p + "attn/in_proj/bias": (3 * width,),
            p + "attn/out_proj/kernel": (width, width),
            p + "attn/out_proj/bias": (width,),
            p + "ln_2/scale": (width,),
            p + "ln_2/bias": (width,),
            p + "mlp/c_fc/kernel": (width, mlp),
            p + "mlp/c_fc/bias": (mlp,),
            p + "mlp/c_proj/kernel": (mlp, width),
            p + "mlp/c_proj/bias": (width,),
        }
    return shapes


def _inputs(shapes, num_tasks, seed):
    key = jax.random.key(seed)
    theta0, tvs, coeffs, grads = {}, {}, {}, {}
    for i, (name, s) in enumerate(shapes.items()):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        theta0[name] = jax.random.normal(k1, s, jnp.float32)
        tvs[name] = (1e-2 * jax.random.normal(k2, (num_tasks, *s))).astype(jnp.bfloat16)
        grads[name] = jax.random.normal(k3, s, jnp.float32)
        coeffs[name] = jnp.full((num_tasks,), 0.3, jnp.float32)
    return theta0, tvs, coeffs, grads


def _op_fn(op: str, impl: str, bs: kernels.BlockSizes | None = None):
    if impl == "merging":  # the XLA code of cljax.merging, for comparison
        from cljax import merging

        if op == "weighted_sum":
            return jax.jit(
                lambda th, tv, c, g: merging.task_arithmetic(th, tv, 0.3, implementation="xla")
            )
        if op == "ties":
            return lambda th, tv, c, g: merging.ties(th, tv, density=0.2, implementation="xla")
        return None
    kw = {"implementation": impl, "block_sizes": bs}
    if op == "weighted_sum":
        return jax.jit(lambda th, tv, c, g: kernels.weighted_sum(th, tv, c, **kw))
    if op == "block_dots":
        return jax.jit(lambda th, tv, c, g: kernels.block_dots(g, tv, **kw))
    return lambda th, tv, c, g: kernels.ties(th, tv, density=0.2, **kw)


def _bytes(op: str, n: int, t: int) -> int:
    if op == "weighted_sum":
        return 4 * n + 2 * t * n + 4 * n
    if op == "block_dots":
        return 4 * n + 2 * t * n
    return 2 * 2 * t * n + 4 * n + 4 * n


def _copy_bandwidth(num_bytes: int, cfg: Config) -> float:
    """``y = x + 1`` with x donated, so the buffer is reused (no page faults of fresh output)."""
    f = jax.jit(lambda x: x + 1, donate_argnums=0)
    state = [jnp.ones((num_bytes // 4,), jnp.float32)]

    def step():
        state[0] = f(state[0])
        state[0].block_until_ready()

    t = _common.median_time(step, warmup=cfg.warmup + 1, repeats=cfg.repeats)
    return 2 * state[0].nbytes / t / 1e9


def run(cfg: Config) -> list[dict]:
    device = jax.devices()[0]
    device_name = f"{device.platform}:{getattr(device, 'device_kind', '')}"
    rows = []
    cases = [(m, t) for m in cfg.models for t in cfg.tasks]
    for model, t in _common.progress(cases, desc="kernels_bench"):
        shapes = vit_shapes(model, cfg.layers)
        n = int(sum(np.prod(s) for s in shapes.values()))
        theta0, tvs, coeffs, grads = _inputs(shapes, t, cfg.seed)
        copy_gbs = _copy_bandwidth(2 * t * n, cfg)
        for op in cfg.ops:
            times, errors = {}, {}
            for impl in cfg.implementations:
                f = _op_fn(op, impl)
                if f is None:
                    continue
                try:  # a kernel that fails to compile on one backend must not end the run
                    times[impl] = _common.median_time(
                        lambda f=f, a=(theta0, tvs, coeffs, grads): jax.block_until_ready(f(*a)),
                        warmup=cfg.warmup,
                        repeats=cfg.repeats,
                    )
                except Exception as e:  # noqa: BLE001 - reported in the table, then go on
                    errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    print(f"{model} T={t} {op} {impl} FAILED: {errors[impl]}", flush=True)
            for impl, err in errors.items():
                rows.append(
                    {
                        "device": device_name,
                        "model": model,
                        "T": t,
                        "op": op,
                        "impl": impl,
                        "error": err,
                    }
                )
            for impl, sec in times.items():
                gbs = _bytes(op, n, t) / sec / 1e9
                row = {
                    "device": device_name,
                    "model": model + ("" if cfg.layers <= 0 else f" ({cfg.layers} blocks)"),
                    "params (M)": n / 1e6,
                    "T": t,
                    "op": op,
                    "impl": impl,
                    "GB moved": _bytes(op, n, t) / 1e9,
                    "ms": 1e3 * sec,
                    "GB/s": gbs,
                    "copy GB/s": copy_gbs,
                    "of copy": gbs / copy_gbs,
                }
                if "xla" in times and impl != "xla":
                    row["speedup vs xla"] = times["xla"] / sec
                rows.append(row)
                if _common.is_primary():  # partial results survive an interrupted run
                    print(
                        " | ".join(
                            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items()
                        ),
                        flush=True,
                    )
    return rows


SWEEP = ((32, 4), (64, 4), (128, 8), (256, 8))  # (rows, num_warps) of the GPU block sweep


def sweep(cfg: Config) -> list[dict]:
    """Pallas ``weighted_sum`` and ``block_dots`` at several GPU block sizes (first model, first T)."""
    model, t = cfg.models[0], cfg.tasks[0]
    shapes = vit_shapes(model, cfg.layers)
    n = int(sum(np.prod(s) for s in shapes.values()))
    theta0, tvs, coeffs, grads = _inputs(shapes, t, cfg.seed)
    copy_gbs = _copy_bandwidth(2 * t * n, cfg)
    rows = []
    for r, w in SWEEP:
        base = kernels.BlockSizes.default("gpu")
        bs = dataclasses.replace(base, rows=r, num_warps=w)
        for op in ("weighted_sum", "block_dots"):
            f = _op_fn(op, "pallas", bs)
            sec = _common.median_time(
                lambda f=f, a=(theta0, tvs, coeffs, grads): jax.block_until_ready(f(*a)),
                warmup=cfg.warmup,
                repeats=cfg.repeats,
            )
            gbs = _bytes(op, n, t) / sec / 1e9
            row = {"model": model, "T": t, "op": op, "rows": r, "warps": w, "ms": 1e3 * sec}
            row |= {"GB/s": gbs, "of copy": gbs / copy_gbs}
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    _common.add_config_flags(parser, Config)
    parser.add_argument("--sweep", action="store_true", help="GPU block-size sweep only")
    args = parser.parse_args(argv)
    cfg = _common.config_from_flags(PRESETS[args.preset], args)
    rows = sweep(cfg) if args.sweep else run(cfg)
    table = _common.format_table(rows, floatfmt=".3g")
    if _common.is_primary():
        print(
            f"machine: {platform.node()} ({platform.processor() or platform.machine()}), "
            f"jax {jax.__version__}, backend {jax.default_backend()}"
        )
        print(table)
        _common.write_json(
            Path(cfg.out) / "results.json",
            {"config": dataclasses.asdict(cfg), "jax": jax.__version__, "rows": rows},
        )
        (Path(cfg.out) / ("sweep.md" if args.sweep else "table.md")).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
