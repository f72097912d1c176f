"""aTLAS and F-MTL step ratios on MiniCLIP and at ViT-B/32 shapes, in one table.

Command::

    python -m experiments.benchmarks.step_ratios                      # both models
    python -m experiments.benchmarks.step_ratios --models miniclip    # MiniCLIP only
    python -m experiments.benchmarks.step_ratios --preset tiny        # smoke test

Two models, each a CLIP image tower (:class:`cljax.models.clip.CLIPImageEncoder`) with a
zero-shot head (L2-normalised features times the class embeddings, frozen, carried in the
batch as the merging experiments do):

* ``miniclip``: the embedded foundation model (:func:`cljax.models.clip.load_pretrained`),
  32×32 images, its zero-shot head of the ten digit names; batch 32, the fine-tuning batch
  of the merging experiment and the few-shot and negation batch of the aTLAS experiment;
* ``vit-b32``: the image tower of ``clip_config("ViT-B/32")`` (87.8M parameters) with
  random weights and a random unit-norm head, 224×224 images; batch 8 (a few seconds a
  step on a 2-core CPU).

Two groups of steps per model, each step the library's own:

* aTLAS against fine-tuning: ``fine-tune`` is :func:`cljax.train.make_step` on all
  encoder parameters with aTLAS's optimiser (:func:`cljax.merging.atlas.default_optimizer`,
  AdamW with clipping); ``aTLAS`` is the step :func:`cljax.merging.atlas.fit` runs, T = 8
  task vectors (random, 1e-3 scale: the time does not depend on their values) and
  block-wise coefficients (:func:`cljax.merging.atlas.blocks` with
  :data:`~cljax.merging.atlas.CLIP_QKV_GROUPS`), timed one step at a time through ``fit``'s
  ``progress`` hook. ``fit`` splits the step into three programs on the CPU and runs one
  on accelerators (``--atlas_split`` forces either).
* F-MTL against its base: :func:`cljax.mtl.make_mtl_step` on the encoder with one linear
  head per task (:class:`cljax.mtl.MultiHead`), 2 tasks; ``EW`` is
  :func:`cljax.mtl.mtl_grad_fn` without aggregator (one backward pass of the mean loss),
  ``PCGrad`` the same with :func:`cljax.mtl.pcgrad`, and each ``F-`` row is
  :func:`cljax.mtl.fmtl` with that aggregator (T+1 forward and 2T backward passes; the
  FLOP bound of ``F-X / EW`` is ``(T + 1 + 4T) / 3``, 3.67 for T = 2).

Timing: every step is compiled first (``lower().compile()``, whose time is the compile
column; for aTLAS, whose programs ``fit`` compiles on its first step, the first step's time
less the steady median), then run ``warmup`` times, then the steps of one group run in
turn, one step each per round, for ``repeats`` rounds (the order reversed every other
round), so that a change of machine load hits every step of the group alike. Each step is
timed on the wall clock and on the process's CPU time (user + system of all its threads; a
loaded machine inflates it less than the wall clock); the table gives the medians and the
ratios of the medians. Peak memory is XLA's static estimate of the compiled step
(arguments + outputs + temporaries − donated aliases; for the three-program aTLAS step, the
largest program plus the composed parameters), what the device must hold.

Expected: aTLAS about 1.1-1.3× fine-tuning at ViT-B/32 shapes (a pass over the 8 task
vectors forward and one backward against the model's forward and backward); on MiniCLIP
about 1.0× (its 8 task vectors are small against a 32-image forward and backward pass).
F-EW and F-PCGrad at most ``(T + 1 + 4T) / 3`` times EW. Runtime: about 3 CPU-minutes
for MiniCLIP (mostly compilation; the tiny preset is compilation alone), 5-6 minutes for
ViT-B/32 at batch 4 with 3 rounds on an idle 2-core CPU. ``docs/results/step-ratios.md`` holds the
measured table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import mtl
from cljax.merging import atlas
from cljax.models import clip
from cljax.train import TrainState, make_step
from experiments import _common

MODELS = ("miniclip", "vit-b32", "tiny")
METHODS: dict[str, Any] = {"EW": None, "PCGrad": mtl.pcgrad, "MGDA": mtl.mgda}
SPLIT = {"auto": None, "one": False, "three": True}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class Config:
    preset: str = "default"
    out: str = "runs/step_ratios"
    models: tuple[str, ...] = ("miniclip", "vit-b32")  # miniclip, vit-b32, tiny
    miniclip_batch: int = 32  # the merging experiment's fine-tuning batch
    vit_b32_batch: int = 8  # a few seconds a step on a 2-core CPU
    num_task_vectors: int = 8  # T of aTLAS
    mtl_tasks: int = 2  # T of F-MTL
    methods: tuple[str, ...] = ("EW", "PCGrad")  # base aggregators (EW, PCGrad, MGDA)
    rho: float = 0.05  # F-MTL's perturbation radius
    repeats: int = 5  # interleaved rounds at ViT-B/32 shapes (one step of each kind a round)
    small_repeats: int = 30  # interleaved rounds on MiniCLIP and tiny (millisecond steps)
    warmup: int = 1  # untimed steps of each kind after compilation
    atlas_split: str = "auto"  # aTLAS step: auto (fit's choice), one or three programs
    # XLA's memory estimate of the aTLAS step (extra compiles; the other steps' is free)
    atlas_memory: bool = True


PRESETS = {
    "default": Config(),
    "tiny": Config(preset="tiny", models=("tiny",), num_task_vectors=2, small_repeats=2),
}


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class _Model:
    name: str
    encoder: clip.CLIPImageEncoder
    params: Any  # encoder parameters
    head: dict  # zero-shot head {"kernel": [D, C], "bias": [C]}
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image: int
    batch: int


def _tiny_config() -> clip.CLIPConfig:
    vision = clip.CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2,
    )  # fmt: skip
    text = clip.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    return clip.CLIPConfig(vision=vision, text=text, projection_dim=8)


def _random_model(name: str, config: clip.CLIPConfig, batch: int) -> _Model:
    """Random encoder weights and a random unit-norm head at logit scale 100."""
    encoder = clip.CLIPImageEncoder(config)
    size = config.vision.image_size
    params = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    w = np.random.default_rng(0).normal(size=(config.projection_dim, 10)).astype(np.float32)
    head = {"kernel": jnp.asarray(100 * w / np.linalg.norm(w, axis=0)), "bias": jnp.zeros(10)}
    return _Model(name, encoder, params, head, (0.5,) * 3, (0.25,) * 3, size, batch)


def load_model(name: str, cfg: Config) -> _Model:
    """``miniclip`` (the embedded checkpoint), ``vit-b32`` or ``tiny`` (random weights)."""
    if name == "miniclip":
        pre = clip.load_pretrained()
        head = clip.zero_shot_head(
            pre.encode_text, DIGITS, clip.TEMPLATES["mnist"], logit_scale=pre.logit_scale
        )
        return _Model(
            "MiniCLIP",
            pre.image_encoder(),
            clip.image_encoder_params(pre.params),
            head,
            pre.mean,
            pre.std,
            pre.model.config.vision.image_size,
            cfg.miniclip_batch,
        )
    if name == "vit-b32":
        return _random_model("ViT-B/32 shape", clip.clip_config("ViT-B/32"), cfg.vit_b32_batch)
    if name == "tiny":
        return _random_model("tiny CLIP", _tiny_config(), 4)
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


# ----------------------------------------------------------------------------- timing


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


class _Clock:
    """A ``progress`` hook for :func:`cljax.merging.atlas.fit` that times every step.

    ``fit`` runs ``for s in progress(range(...)): state, m = step(state, batch_at(s))``
    and its step syncs on the host (the non-finite check), so the time between two
    resumptions of this generator is one step.
    """

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, steps: Iterable[int]) -> Iterator[int]:
        t0, c0 = time.perf_counter(), time.process_time()
        for s in steps:
            yield s
            t1, c1 = time.perf_counter(), time.process_time()
            self.wall.append(t1 - t0)
            self.cpu.append(c1 - c0)
            t0, c0 = t1, c1


@dataclasses.dataclass
class _Step:
    """One kind of step: ``run()`` performs one step, blocking, and returns its (wall, cpu)."""

    name: str
    run: Callable[[], tuple[float, float]]
    compile_s: float
    memory_mib: float | None
    first_s: float | None = None  # first step (compile + run) when compiled on first use
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)


def _compiled_step(name: str, step, state, batch) -> _Step:
    """A library step (``make_step`` / ``make_mtl_step``) compiled ahead and timed per call.

    Calls the compiled program directly and reads ``metrics["finite"]`` on the host, as the
    library's non-finite check does after every step.
    """
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = [state]

    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        box[0], metrics = compiled(box[0], batch)
        if not bool(metrics["finite"]):
            raise FloatingPointError(f"{name}: non-finite step")
        return time.perf_counter() - t0, time.process_time() - c0

    return _Step(name, run, compile_s, _common.compiled_memory_mib(compiled))


def _interleave(steps: list[_Step], warmup: int, repeats: int) -> None:
    """Warm-up, then ``repeats`` rounds of one step of each kind (order reversed every
    other round); the timings go to each step's ``wall`` and ``cpu``."""
    for s in steps:
        for _ in range(warmup):
            s.run()
    for r in range(repeats):
        for s in steps if r % 2 == 0 else steps[::-1]:
            wall, cpu = s.run()
            s.wall.append(wall)
            s.cpu.append(cpu)


# ----------------------------------------------------------------------------- the groups


def _images(m: _Model, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (m.batch, m.image, m.image, 3), dtype=np.uint8)


def atlas_group(m: _Model, cfg: Config) -> tuple[list[_Step], dict]:
    """Fine-tuning and the aTLAS step of :func:`cljax.merging.atlas.fit`, ready to time."""
    encoder = m.encoder

    def loss(p, batch, rng):
        x = clip.normalize_images(batch["x"], m.mean, m.std)
        logits = clip.head_logits(batch["head"], encoder.apply({"params": p}, x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    x = jnp.asarray(_images(m, 0))
    batch = {"x": x, "y": jnp.arange(m.batch) % 10, "head": m.head}
    tx = atlas.default_optimizer()
    ft = _compiled_step("fine-tune", make_step(loss), TrainState.create(m.params, tx), batch)

    t = cfg.num_task_vectors
    taus = _common.random_task_vectors(m.params, t, jax.random.key(1))
    spec = atlas.blocks(m.params, groups=atlas.CLIP_QKV_GROUPS)
    split = SPLIT[cfg.atlas_split]
    three = jax.default_backend() == "cpu" if split is None else split
    fit = functools.partial(
        atlas.fit,
        loss,
        m.params,
        taus,
        lambda s: batch,
        epochs=1,
        steps_per_epoch=1,
        spec=spec,
        optimizer=tx,
        split_step=split,
    )

    def run_atlas() -> tuple[float, float]:
        clock = _Clock()
        fit(progress=clock)
        return clock.wall[0], clock.cpu[0]

    first, _ = run_atlas()  # compiles ``fit``'s step (cached for every later fit)
    mem = _atlas_memory(loss, m.params, taus, spec, tx, batch, three) if cfg.atlas_memory else None
    name = f"aTLAS (T={t}, {'3 programs' if three else '1 program'})"
    at = _Step(name, run_atlas, 0.0, mem, first_s=first)
    meta = {
        "blocks": spec.num_blocks,
        "coefficients": spec.num_coefficients(t),
        "task_vectors_mib": _nbytes(taus) / 2**20,
        "atlas_programs": 3 if three else 1,
    }
    return [ft, at], meta


def _atlas_memory(loss, params, taus, spec, tx, batch, three: bool) -> float | None:
    """XLA's memory estimate of the aTLAS step in the form ``fit`` runs it.

    One program: the composition, the model's value and gradient, the coefficient gradient
    and the update in one compiled step. Three programs: the largest of compose, the
    model's value and gradient, and the coefficient gradient with the update, plus the
    composed parameters, which live from the first program to the second.
    """
    coefs = atlas.init(params, taus, spec)
    state = TrainState.create(coefs, tx)
    if not three:

        def objective(c, packed, rng):
            b, theta0, tv = packed
            return loss(atlas.compose(theta0, tv, c, spec), b, rng)

        step = make_step(objective)
        return _common.compiled_memory_mib(step.lower(state, (batch, params, taus)).compile())

    compose = jax.jit(lambda p, tv, c: atlas.compose(p, tv, c, spec))
    model_grad = jax.jit(jax.value_and_grad(loss))

    def update(c, opt, p, tv, g):
        _, vjp = jax.vjp(lambda c: atlas.compose(p, tv, c, spec), c)
        upd, opt = tx.update(vjp(g)[0], opt, c)
        return optax.apply_updates(c, upd), opt

    mems = [
        _common.compiled_memory_mib(compose.lower(params, taus, coefs).compile()),
        _common.compiled_memory_mib(model_grad.lower(params, batch, jax.random.key(0)).compile()),
        _common.compiled_memory_mib(
            jax.jit(update, donate_argnums=(0, 1))
            .lower(coefs, state.opt_state, params, taus, params)
            .compile()
        ),
    ]
    if any(v is None for v in mems):
        return None
    return max(v for v in mems if v is not None) + _nbytes(params) / 2**20


def mtl_group(m: _Model, cfg: Config) -> list[_Step]:
    """Each base aggregator of ``cfg.methods`` and its F-MTL variant, ready to time."""
    t = cfg.mtl_tasks
    model = mtl.MultiHead(m.encoder, (10,) * t)
    x = clip.normalize_images(_images(m, 1), m.mean, m.std)
    y = jnp.asarray(np.random.default_rng(2).integers(0, 10, (m.batch, t)), jnp.int32)
    batch = {"x": x, "y": y}
    params = dict(jax.jit(model.init)(jax.random.key(0), x[:1])["params"])
    params[next(k for k in params if not k.startswith("head_"))] = m.params  # pretrained trunk

    def losses(p, b):
        return mtl.classification_losses(model.apply({"params": p}, b["x"]), b["y"])

    steps = []
    for name in cfg.methods:
        agg = METHODS[name]
        for f in (False, True):
            if f:
                grad_fn = mtl.fmtl(
                    losses, agg or mtl.linear, rho=cfg.rho, head_rules=mtl.HEAD_RULES
                )
            else:
                grad_fn = mtl.mtl_grad_fn(losses, agg, head_rules=mtl.HEAD_RULES)
            state = TrainState.create(params, optax.adam(1e-3))
            step = mtl.make_mtl_step(grad_fn)
            steps.append(_compiled_step(("F-" if f else "") + name, step, state, batch))
    return steps


# ----------------------------------------------------------------------------- the table


def _rows(model: str, batch: int, steps: list[_Step], base_of: dict[str, str]) -> list[dict]:
    by = {s.name: s for s in steps}
    rows = []
    for s in steps:
        wall, cpu = statistics.median(s.wall), statistics.median(s.cpu)
        base = by.get(base_of.get(s.name, ""))
        compile_s = s.compile_s if s.first_s is None else max(s.first_s - wall, 0.0)
        row = {
            "model": model,
            "batch": batch,
            "step": s.name,
            "compile (s)": compile_s,
            "wall (ms)": 1e3 * wall,
            "CPU (ms)": 1e3 * cpu,
            "of": base.name if base else "",
            "× (wall)": wall / statistics.median(base.wall) if base else "",
            "× (CPU)": cpu / statistics.median(base.cpu) if base else "",
            "peak (MiB)": s.memory_mib if s.memory_mib is not None else "n/a",
            "wall_all_s": list(s.wall),
            "cpu_all_s": list(s.cpu),
        }
        rows.append(row)
    return rows


COLUMNS = [
    "model", "batch", "step", "compile (s)", "wall (ms)", "CPU (ms)", "of", "× (wall)",
    "× (CPU)", "peak (MiB)",
]  # fmt: skip


def _check(cfg: Config) -> None:
    for name in cfg.models:
        if name not in MODELS:
            raise ValueError(f"models: unknown {name!r}; known: {MODELS}")
    for name in cfg.methods:
        if name not in METHODS:
            raise ValueError(f"methods: unknown {name!r}; known: {tuple(METHODS)}")
    if cfg.atlas_split not in SPLIT:
        raise ValueError(f"atlas_split={cfg.atlas_split!r} must be one of {tuple(SPLIT)}")
    for field in ("num_task_vectors", "mtl_tasks", "repeats", "small_repeats"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"{field}={getattr(cfg, field)} must be >= 1")


def _git_head() -> str:
    """The checkout's commit, ``+`` if its tracked files differ from it (the code timed)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cfg: Config) -> dict:
    """Builds and times both groups for every model of ``cfg``; returns the rows and meta."""
    _check(cfg)
    rows: list[dict] = []
    meta: dict[str, Any] = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "git_head": _git_head(),
    }
    for name in cfg.models:
        m = load_model(name, cfg)
        reps = cfg.repeats if name == "vit-b32" else cfg.small_repeats
        n = sum(x.size for x in jax.tree.leaves(m.params))
        _log(f"{m.name}: {n / 1e6:.2f}M parameters, batch {m.batch}")
        group, info = atlas_group(m, cfg)
        _log(f"{m.name}: aTLAS group compiled; {reps} rounds")
        _interleave(group, cfg.warmup, reps)
        rows += _rows(m.name, m.batch, group, {group[1].name: "fine-tune"})
        del group
        group = mtl_group(m, cfg)
        _log(f"{m.name}: F-MTL group compiled; {reps} rounds")
        _interleave(group, cfg.warmup, reps)
        base_of = {f"F-{k}": k for k in cfg.methods}
        base_of |= {k: "EW" for k in cfg.methods if k != "EW"}
        rows += _rows(m.name, m.batch, group, base_of)
        del group
        meta[m.name] = {"params": int(n), "rounds": reps, **info}
        print(_common.format_table(rows[-2 - 2 * len(cfg.methods) :], COLUMNS, ".2f"))
    meta["load_average_end"] = os.getloadavg()
    return {"rows": rows, "meta": meta, "config": dataclasses.asdict(cfg)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_config_flags(parser, Config)
    args = parser.parse_args(argv)
    cfg = _common.config_from_flags(PRESETS[args.preset or "default"], args)
    res = run(cfg)
    if _common.is_primary():
        mt = cfg.mtl_tasks
        print(
            f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {os.cpu_count()} cores, "
            f"load average {res['meta']['load_average_start'][0]:.1f} at the start, "
            f"{res['meta']['load_average_end'][0]:.1f} at the end; F-MTL bound "
            f"(T+1+4T)/3 = {(mt + 1 + 4 * mt) / 3:.2f} × EW for T = {mt}\n"
        )
        print(_common.format_table(res["rows"], COLUMNS, floatfmt=".2f"))
        _common.write_json(Path(cfg.out) / "results.json", res)
    return res


if __name__ == "__main__":
    main()
