"""Step time of plain Adam vs Adam + GPM, CoSO (exact / randomized SVD) and Adam + OSFT.

Two models: the PMNIST MLP of the GPM paper (784-100-100-10, batch 32) and a stack of
ViT-B/16-shaped attention projections (12 x 768x768 kernels, ``--tokens`` rows a step,
default 8 images x 197 tokens). A step is the whole jitted train step: forward, backward,
optimiser (and projection) update, parameter update, with the state donated. Memories and
frozen bases are filled (GPM: half the input space stored; OSFT: half the spectrum frozen;
CoSO: history of 100 directions, proj_rank 15, sketch rank 100 as the reference's CIFAR
config).

Command::

    python -m experiments.benchmarks.projection_bench            # ~2-4 min on an idle 2-core CPU
    python -m experiments.benchmarks.projection_bench --tokens 394 --repeats 3

Expected: GPM and OSFT add two / four ``d x d x out`` matmuls per target to a step whose
forward+backward costs ``6 N d out``; their ratio to plain Adam is about
``1 + d / (3N)`` and ``1 + 2m / (3N)`` (m: OSFT's stored basis width, half of d here),
i.e. <= 1.3x for ViT batches of >= 8 images.
CoSO pays an SVD of every target gradient each step (exact in the reference), which
dominates on a CPU; the randomized SVD cuts it.
"""

from __future__ import annotations

import os

# LAPACK/BLAS thread pools oversubscribe a shared CPU (a small SVD slows down by orders of
# magnitude with the default threads under load): one thread each, set before numpy loads.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cljax import projection as pj  # noqa: E402
from experiments import _common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int = 8 * 197
    layers: int = 12
    dim: int = 768
    mlp_batch: int = 32
    warmup: int = 2
    repeats: int = 5
    out: str = "runs/projection_bench"


def _orthonormal(rng, d, k):
    q, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return jnp.asarray(np.pad(q, ((0, 0), (0, d - k))), jnp.float32)


def _fill(opt_state, params, rules, rng):
    """Non-trivial projection states (the cost of the projection does not depend on them)."""

    def gpm_fill(s):
        mem = tuple(_orthonormal(rng, m.shape[0], m.shape[0] // 2) for m in s.memory)
        return s._replace(memory=mem, task=jnp.ones((), jnp.int32))

    def osft_fill(s):
        ws = pj.target_leaves(params, rules)
        return pj.osft_next_task(s, ws, ratios=0.5)

    def coso_fill(s):
        hist = tuple(_orthonormal(rng, h.shape[0], min(100, h.shape[0] // 2)) for h in s.history)
        return s._replace(history=hist)

    for cls, fn in ((pj.GPMState, gpm_fill), (pj.OSFTState, osft_fill), (pj.CoSOState, coso_fill)):
        if pj.find_state(opt_state, cls):
            opt_state = pj.map_state(opt_state, cls, fn)
    return opt_state


def _variants(lr, rules, proj_rank, sketch_rank):
    return {
        "adam": optax.adam(lr),
        "adam+gpm": optax.chain(optax.adam(lr), pj.gpm(rules)),
        "adam+osft": optax.chain(optax.adam(lr), pj.osft(rules, max_ratio=0.5)),
        "coso (exact svd)": pj.coso(lr, rules, proj_rank=proj_rank, sketch_rank=sketch_rank),
        "coso (randomized svd)": pj.coso(
            lr, rules, proj_rank=proj_rank, sketch_rank=sketch_rank, svd="randomized"
        ),
    }


def _time_model(name, params, loss, batch, variants, cfg, rng, rules):
    rows = []
    base = None
    for vname, tx in _common.progress(variants.items(), name, len(variants)):
        opt_state = _fill(tx.init(params), params, rules, rng)

        def step(p, s, b, tx=tx):
            g = jax.grad(loss)(p, b)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        step = jax.jit(step, donate_argnums=(0, 1))
        carry = [jax.tree.map(jnp.array, params), opt_state]

        def run(carry=carry, step=step):
            carry[0], carry[1] = step(carry[0], carry[1], batch)
            jax.block_until_ready(carry[0])

        t = _common.median_time(run, warmup=cfg.warmup, repeats=cfg.repeats)
        base = t if base is None else base
        rows.append({"model": name, "method": vname, "ms/step": 1e3 * t, "x plain adam": t / base})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_config_flags(parser, Config)
    cfg = _common.config_from_flags(Config(), parser.parse_args(argv))
    rng = np.random.default_rng(0)
    rows = []

    # PMNIST MLP (no biases), all three kernels protected.
    dims = [784, 100, 100, 10]
    mlp = {
        f"Dense_{i}": {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)}
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    }

    def mlp_loss(p, b):
        h = b["x"]
        for i in range(3):
            h = h @ p[f"Dense_{i}"]["kernel"]
            h = jax.nn.relu(h) if i < 2 else h
        return optax.softmax_cross_entropy_with_integer_labels(h, b["y"]).mean()

    mb = {
        "x": jnp.asarray(rng.uniform(size=(cfg.mlp_batch, 784)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, cfg.mlp_batch), jnp.int32),
    }
    rules = [("kernel", True)]
    rows += _time_model(
        "pmnist mlp", mlp, mlp_loss, mb, _variants(1e-3, rules, 10, 40), cfg, rng, rules
    )

    # Stack of ViT-B/16 attention projections.
    d = cfg.dim
    stack = {
        f"proj_{i:02d}": {"kernel": jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)}
        for i in range(cfg.layers)
    }

    def stack_loss(p, b):
        h = b["x"]
        for i in range(cfg.layers):
            h = h + jnp.tanh(h @ p[f"proj_{i:02d}"]["kernel"])
        return jnp.mean(h**2)

    sb = {"x": jnp.asarray(rng.normal(size=(cfg.tokens, d)), jnp.float32)}
    rows += _time_model(
        f"{cfg.layers}x{d}x{d} stack, {cfg.tokens} tokens",
        stack,
        stack_loss,
        sb,
        _variants(1e-4, rules, 15, 100),
        cfg,
        rng,
        rules,
    )
    table = _common.format_table(rows, floatfmt=".2f")
    if _common.is_primary():
        print(table)
        _common.write_json(
            f"{cfg.out}/results.json", {"config": dataclasses.asdict(cfg), "rows": rows}
        )
    return rows


if __name__ == "__main__":
    main()
