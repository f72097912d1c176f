"""Speed and memory of the merges on the parameter shapes of CLIP ViT-B/32's image encoder.

T random task vectors (float32, stacked) on a pytree with the leaves of the open_clip ViT-B/32
visual tower (conv1 768x3x32x32, class and positional embeddings, 12 blocks of
ln_1/attn in_proj 2304x768/out_proj/ln_2/mlp 3072x768 and 768x3072 with biases, ln_post,
proj 768x512: 87.8M parameters). Every operation is jitted and timed after warm-up (median
of ``--repeats`` runs), next to the machine's copy bandwidth measured in the same run (a
jitted ``x + 1`` over the stacked task vectors).

* bytes that must move: task arithmetic and TIES read T·P + P floats and write P (one
  pass is the floor for both); DARE reads T·P and writes T·P; DARE followed by task
  arithmetic in one computation reads T·P + P and writes P; the copy reads and writes T·P.
* memory: XLA's compiled plan (``memory_analysis``: temporaries + output; the peak is at
  most the inputs plus these) and the process's resident set measured during one call
  (``/proc/self/statm`` sampled every millisecond; peak minus the level before the call,
  output included), both relative to the inputs. The resident set under-reads where the
  allocator hands out pages that earlier rows freed: the plan is the bound to trust.
* first call: the public merge called eagerly once before anything else is compiled
  (compilation plus one run, what a user merging once waits), wall clock and the process's
  CPU time (user + system; a busy machine inflates it less than the wall clock).

Command:
  python -m experiments.benchmarks.merge_bench              # full size, ~4 GB of RAM, ~3 min
  python -m experiments.benchmarks.merge_bench --scale 0.1  # widths x sqrt(0.1), ~30 s
  python -m experiments.benchmarks.merge_bench --preset tiny  # smoke test, seconds

Expected (2-core CPU): task arithmetic near the copy bandwidth; global TIES a few times
task arithmetic (its threshold search reads the task vectors once per pass); peak memory
little above the inputs. ``docs/results/merge-speed.md`` holds the measured tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import threading
import time

import jax
import jax.numpy as jnp

from cljax import merging
from cljax.kernels._ties_threshold import xla as _threshold_xla
from cljax.merging import _ties
from experiments import _common


@dataclasses.dataclass(frozen=True)
class Config:
    scale: float = 1.0  # parameter count relative to ViT-B/32 (widths scale by sqrt)
    tasks: int = 8
    repeats: int = 5
    warmup: int = 1
    pairs: int = 21  # alternating task arithmetic / global TIES calls for their ratio
    density: float = 0.2
    drop_rate: float = 0.9
    out: str = "runs/merge_bench"
    preset: str = "full"


PRESETS = {"full": Config(), "tiny": Config(scale=0.002, tasks=2, repeats=1, warmup=1, pairs=3)}


def _reduce_over_t(theta0, tau, scale):
    """θ0 + λ·Σ_t τ_t with one reduction over the stacked leading axis: the formulation the
    library avoids (XLA:CPU reduces a leading axis slowly), timed for comparison."""
    total = jnp.sum(tau.astype(jnp.float32), axis=0)
    return (theta0.astype(jnp.float32) + scale * total).astype(theta0.dtype)


def vit_b32_shapes(scale: float = 1.0) -> dict:
    """Leaf shapes of the ViT-B/32 image encoder, widths scaled by ``sqrt(scale)``."""
    r = math.sqrt(scale)
    w = max(8, int(round(768 * r / 8)) * 8)  # width
    m = 4 * w  # mlp
    e = max(8, int(round(512 * r / 8)) * 8)  # embedding
    block = {
        "ln_1": {"scale": (w,), "bias": (w,)},
        "attn": {"in_proj_weight": (3 * w, w), "in_proj_bias": (3 * w,)},
        "attn_out": {"weight": (w, w), "bias": (w,)},
        "ln_2": {"scale": (w,), "bias": (w,)},
        "mlp": {
            "c_fc": {"weight": (m, w), "bias": (m,)},
            "c_proj": {"weight": (w, m), "bias": (w,)},
        },
    }
    return {
        "conv1": (w, 3, 32, 32),
        "class_embedding": (w,),
        "positional_embedding": (50, w),
        "ln_pre": {"scale": (w,), "bias": (w,)},
        "blocks": {f"{i:02d}": block for i in range(12)},
        "ln_post": {"scale": (w,), "bias": (w,)},
        "proj": (w, e),
    }


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def random_trees(shapes: dict, num_tasks: int, seed: int = 0):
    """Pretrained tree (unit-scale) and T stacked task vectors (scale 1e-3), float32."""
    specs = jax.tree.leaves(shapes, is_leaf=_is_shape)
    treedef = jax.tree.structure(shapes, is_leaf=_is_shape)
    key = jax.random.key(seed)
    pre, tvs = [], []
    for i, s in enumerate(specs):
        kp, kt = jax.random.split(jax.random.fold_in(key, i))
        pre.append(jax.random.normal(kp, s, jnp.float32) * 0.02)
        tvs.append(jax.random.normal(kt, (num_tasks, *s), jnp.float32) * 1e-3)
    return jax.tree.unflatten(treedef, pre), jax.tree.unflatten(treedef, tvs)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_delta(fn) -> int:
    """Peak resident-set growth (bytes) while ``fn()`` runs, sampled every millisecond."""
    before, peak, done = _rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out = fn()
    jax.block_until_ready(out)
    peak[0] = max(peak[0], _rss())
    done.set()
    th.join()
    del out
    return peak[0] - before


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run(cfg: Config) -> dict:
    shapes = vit_b32_shapes(cfg.scale)
    pre, tvs = random_trees(shapes, cfg.tasks)
    jax.block_until_ready(tvs)
    p_bytes, tv_bytes = nbytes(pre), nbytes(tvs)
    num_params = p_bytes // 4
    in_bytes = p_bytes + tv_bytes
    key = jax.random.key(1)
    k = max(1, math.floor(cfg.density * num_params + 0.5))
    mask = tuple(True for _ in jax.tree.leaves(pre))
    # A threshold near the k-th magnitude (1e-3 normal task vectors) for the parts' rows.
    kth = 1e-3 * statistics.NormalDist().inv_cdf(1 - cfg.density / 2)
    lo_bits = _threshold_xla.magnitude_bits(jnp.full((cfg.tasks,), kth, jnp.float32))
    candidates = jnp.stack([jnp.full((cfg.tasks,), kth * f, jnp.float32) for f in (0.9, 1, 1.1)])

    ops = {
        "copy (x + 1 on the task vectors)": (
            jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t)),
            (tvs,),
            2 * tv_bytes,
        ),
        "task arithmetic (sum of slices)": (
            jax.jit(lambda p, t: merging.task_arithmetic(p, t, 0.3)),
            (pre, tvs),
            in_bytes + p_bytes,
        ),
        "task arithmetic (reduce over T)": (
            jax.jit(lambda p, t: jax.tree.map(lambda x, tv: _reduce_over_t(x, tv, 0.3), p, t)),
            (pre, tvs),
            in_bytes + p_bytes,
        ),
        "TIES threshold search only": (
            jax.jit(lambda t: _threshold_xla.kth_largest_bits(jax.tree.leaves(t), k)),
            (tvs,),
            tv_bytes,
        ),
        # Where global TIES spends its time: one counting pass of three candidates, the
        # listing pass, and the marked merge once the thresholds are known.
        "TIES part: one counting pass": (
            jax.jit(lambda t, c: _threshold_xla.count_at_least_many(jax.tree.leaves(t), c)),
            (tvs, candidates),
            tv_bytes,
        ),
        "TIES part: one listing pass": (
            jax.jit(
                lambda t, lo, hi: _threshold_xla.bracket_entries(jax.tree.leaves(t), lo, hi, 128)
            ),
            (tvs, lo_bits, lo_bits + 1024),
            tv_bytes,
        ),
        "TIES part: merge, thresholds given": (
            jax.jit(
                lambda p, t, thr: _ties._disjoint_merge(
                    jax.tree.leaves(p),
                    jax.tree.leaves(t),
                    dict.fromkeys(range(len(mask)), thr),
                    1.0,
                    jnp.float32(1.0),
                    True,
                    mask=mask,
                    num_tasks=cfg.tasks,
                    merge="mean",
                )
            ),
            (pre, tvs, lo_bits),
            in_bytes + p_bytes,
        ),
        "TIES (global, dis-mean)": (
            jax.jit(lambda p, t: merging.ties(p, t, density=cfg.density)),
            (pre, tvs),
            in_bytes + p_bytes,
        ),
        "TIES (per leaf, dis-mean)": (
            jax.jit(lambda p, t: merging.ties(p, t, density=cfg.density, scope="leaf")),
            (pre, tvs),
            in_bytes + p_bytes,
        ),
        f"DARE (p={cfg.drop_rate:.1f})": (
            jax.jit(lambda t, kk: merging.dare(t, drop_rate=cfg.drop_rate, key=kk)),
            (tvs, key),
            2 * tv_bytes,
        ),
        # As DARE is used: its output merged at once (the masks never reach memory).
        f"DARE (p={cfg.drop_rate:.1f}) + task arithmetic": (
            jax.jit(
                lambda p, t, kk: merging.task_arithmetic(
                    p, merging.dare(t, drop_rate=cfg.drop_rate, key=kk), 0.3
                )
            ),
            (pre, tvs, key),
            in_bytes + p_bytes,
        ),
    }
    # First calls of the public merges, eager, before anything below compiles: compilation
    # plus one run, what a user merging once waits (wall clock and process CPU time).
    first_calls = {
        "task arithmetic (sum of slices)": lambda: merging.task_arithmetic(pre, tvs, 0.3),
        "TIES (global, dis-mean)": lambda: merging.ties(pre, tvs, density=cfg.density),
        "TIES (per leaf, dis-mean)": lambda: merging.ties(
            pre, tvs, density=cfg.density, scope="leaf"
        ),
        f"DARE (p={cfg.drop_rate:.1f})": lambda: merging.dare(
            tvs, drop_rate=cfg.drop_rate, key=key
        ),
    }
    first = {}
    for name, fn in first_calls.items():
        cpu = time.process_time()
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first[name] = (time.perf_counter() - start, time.process_time() - cpu)
        if _common.is_primary():
            print(f"first call of {name}: {first[name][0]:.2f} s, CPU {first[name][1]:.2f} s")
    rows = []
    times = {}
    executables = {}
    for name, (fn, args, moved) in _common.progress(
        ops.items(), desc="merge_bench", total=len(ops)
    ):
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        ma = compiled.memory_analysis()
        xla_extra = None
        if ma is not None:
            xla_extra = ma.temp_size_in_bytes + ma.output_size_in_bytes
        arg_bytes = sum(
            nbytes(a) for a in args if not isinstance(a, jax.Array) or a.dtype != key.dtype
        )
        call = lambda compiled=compiled, args=args: jax.block_until_ready(compiled(*args))
        executables[name] = call
        t = _common.median_time(call, warmup=cfg.warmup, repeats=cfg.repeats)
        rss = peak_rss_delta(lambda compiled=compiled, args=args: compiled(*args))
        times[name] = t
        rows.append(
            {
                "operation": name,
                "time (ms)": 1e3 * t,
                "GB moved": moved / 1e9,
                "GB/s": moved / t / 1e9,
                "XLA temp+out / inputs": (xla_extra / arg_bytes)
                if xla_extra is not None
                else float("nan"),
                "RSS peak / inputs": (arg_bytes + rss) / arg_bytes,
                "compile (s)": compile_s,
                "first call (s)": first.get(name, (float("nan"),))[0],
                "first call CPU (s)": first.get(name, (float("nan"), float("nan")))[1],
            }
        )
        if _common.is_primary():  # partial results survive an interrupted run
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()})
    # The ratio that the target names, measured pair by pair: task arithmetic and global
    # TIES called alternately, so that a slow spell of this shared machine hits both.
    pairs = []
    for _ in range(cfg.pairs):
        pair = []
        for name in ("task arithmetic (sum of slices)", "TIES (global, dis-mean)"):
            start = time.perf_counter()
            executables[name]()
            pair.append(time.perf_counter() - start)
        pairs.append(pair)
    ratios = sorted(b / a for a, b in pairs)
    interleaved = {
        "pairs": cfg.pairs,
        "task arithmetic median (ms)": 1e3 * statistics.median(a for a, _ in pairs),
        "global TIES median (ms)": 1e3 * statistics.median(b for _, b in pairs),
        "ratio median": statistics.median(ratios),
        "ratio quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
    }
    copy_bw = rows[0]["GB/s"]
    ta = times["task arithmetic (sum of slices)"]
    for r in rows:
        r["% of copy BW"] = 100 * r["GB/s"] / copy_bw
        r["x task arithmetic"] = times[r["operation"]] / ta
    return {
        "config": dataclasses.asdict(cfg),
        "num_params": num_params,
        "input_bytes": in_bytes,
        "devices": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "time_median_s": times,
        "interleaved": interleaved,
        "load_average": os.getloadavg(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    base = PRESETS[args.preset or "full"]
    cfg = _common.config_from_flags(base, args)
    res = run(cfg)
    cols = [
        "operation",
        "time (ms)",
        "GB moved",
        "GB/s",
        "% of copy BW",
        "x task arithmetic",
        "XLA temp+out / inputs",
        "RSS peak / inputs",
        "compile (s)",
        "first call (s)",
        "first call CPU (s)",
    ]
    if _common.is_primary():
        print(
            f"\n{res['num_params'] / 1e6:.1f}M parameters x {cfg.tasks} task vectors, "
            f"inputs {res['input_bytes'] / 1e9:.2f} GB, {res['cpu_count']} CPU cores, "
            f"load average {res['load_average'][0]:.1f} at the end\n"
        )
        print(_common.format_table(res["rows"], cols, floatfmt=".2f"))
        il = res["interleaved"]
        print(
            f"\nglobal TIES / task arithmetic, {il['pairs']} alternating pairs: median ratio "
            f"{il['ratio median']:.2f} (quartiles {il['ratio quartiles'][0]:.2f}-"
            f"{il['ratio quartiles'][1]:.2f}); medians {il['global TIES median (ms)']:.1f} ms "
            f"and {il['task arithmetic median (ms)']:.1f} ms"
        )
        _common.write_json(os.path.join(cfg.out, "results.json"), res)
    return res


if __name__ == "__main__":
    main()
