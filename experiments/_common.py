"""Shared plumbing of the experiments: output folders, tables, JSON, plots, progress, timing.

Library code never imports this module (STYLE rule 11): experiments unpack their config
dataclasses into library calls and use these helpers for everything around them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import os
import statistics
import sys
import textwrap
import time
import tokenize
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_config_flags",
    "bar_chart",
    "compiled_memory_mib",
    "config_from_flags",
    "format_table",
    "is_primary",
    "mean_std",
    "median_time",
    "progress",
    "random_task_vectors",
    "run_from_flags",
    "tiny_clip",
    "tiny_clip_config",
    "write_json",
]


def is_primary() -> bool:
    """Only process 0 writes files and prints tables in multi-host runs.

    :func:`cljax.sharding.is_primary`, imported on call so that ``--help`` stays free of JAX.
    """
    from cljax.sharding import is_primary as primary

    return primary()


def _field_comments(config_cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``# comment`` on a field's line of the class source (or
    the comment lines right above it); empty if the source cannot be read."""
    try:
        src = textwrap.dedent(inspect.getsource(config_cls))
        tree = ast.parse(src)
        comments: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    lines = src.splitlines()
    out = {}
    cls = tree.body[0] if tree.body and isinstance(tree.body[0], ast.ClassDef) else None
    for node in cls.body if cls is not None else []:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        text = [comments[n] for n in range(node.lineno, end + 1) if n in comments]
        if not text:  # comment-only lines directly above the field
            n = node.lineno - 1
            while n in comments and lines[n - 1].lstrip().startswith("#"):
                text.insert(0, comments[n])
                n -= 1
        if text:
            out[node.target.id] = " ".join(t for t in text if t)
    return out


def _fmt_default(v: Any) -> str:
    if isinstance(v, tuple | list):
        return " ".join(map(str, v)) if v else "(empty)"
    if isinstance(v, str):
        return repr(v) if v == "" else v
    return str(v)


def _presets_of(config_cls: type) -> list[str]:
    module = sys.modules.get(config_cls.__module__)
    presets = getattr(module, "PRESETS", None)
    return [str(k) for k in presets] if isinstance(presets, Mapping) else []


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    presets: Iterable[str] | None = None,
    help: Mapping[str, str] | None = None,
) -> None:
    """Adds ``--field`` flags for the scalar and tuple fields of a config dataclass.

    Every flag's default is ``None`` (so :func:`config_from_flags` changes only what was
    given) and its help shows the dataclass default. The help text comes from ``help``
    (``{field: text}``), else from ``dataclasses.field(metadata={"help": ...})``, else from the ``# comment`` on the
    field's line (or the comment lines right above it), else from the field's name and type.
    The preset names (``presets``, default: the keys of ``PRESETS`` in the config's module)
    are listed in the ``--preset`` help and in the epilog, unless the parser has one.
    """
    comments = _field_comments(config_cls)
    names = list(presets) if presets is not None else _presets_of(config_cls)
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        text = (
            (help or {}).get(f.name)
            or f.metadata.get("help")
            or comments.get(f.name)
            or f.name.replace("_", " ")
        )
        if f.name == "preset" and names:
            text += f"; one of: {', '.join(names)}"
        text = f"{text} (default: {_fmt_default(default)})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(
                f"--{f.name}",
                type=lambda s: s.lower() in ("1", "true", "yes"),
                default=None,
                metavar="BOOL",
                help=text,
            )
        elif isinstance(default, int | float | str):
            kind = type(default).__name__.upper()
            parser.add_argument(
                f"--{f.name}", type=type(default), default=None, metavar=kind, help=text
            )
        elif isinstance(default, tuple | list):
            elem = type(default[0]) if default else str
            parser.add_argument(
                f"--{f.name}",
                type=elem,
                nargs="+",
                default=None,
                metavar=elem.__name__.upper(),
                help=text,
            )
    if names and not parser.epilog:
        parser.epilog = (
            f"presets: {', '.join(names)} (--preset NAME; a preset replaces some of the "
            "defaults shown above)"
        )


def config_from_flags(base: Any, args: argparse.Namespace) -> Any:
    """Returns ``base`` with every flag that was given on the command line replaced."""
    changes = {}
    for f in dataclasses.fields(base):
        v = getattr(args, f.name, None)
        if v is not None:
            changes[f.name] = tuple(v) if isinstance(getattr(base, f.name), tuple) else v
    return dataclasses.replace(base, **changes)


def run_from_flags(
    run: Callable[[Any], dict],
    config_cls: type,
    presets: Mapping[str, Any],
    argv: Sequence[str] | None,
    *,
    description: str,
    help: Mapping[str, str] | None = None,
) -> tuple[Any, dict]:
    """Parses ``--preset`` and the config flags, runs ``run(cfg)`` and times it.

    Returns ``(cfg, results)`` with ``results["seconds"]`` (wall) and
    ``results["cpu_seconds"]`` (this process's CPU time) added.
    """
    parser = argparse.ArgumentParser(description=description)
    add_config_flags(parser, config_cls, help=help)
    args = parser.parse_args(argv)
    cfg = config_from_flags(presets[args.preset or "default"], args)
    t0, c0 = time.perf_counter(), time.process_time()
    results = run(cfg)
    results["seconds"] = time.perf_counter() - t0
    results["cpu_seconds"] = time.process_time() - c0
    return cfg, results


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def format_table(
    rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".1f"
) -> str:
    """A GitHub-markdown table of dict rows (floats formatted with ``floatfmt``)."""
    if not rows:
        return "(no rows)"
    if columns is None:  # every key of every row, in order of first appearance
        columns = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: (
        "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"
    )
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in cells)])


def use_compilation_cache(folder: str | os.PathLike, min_compile_time_s: float = 0.0) -> None:
    """Keeps the programs this process compiles in XLA's persistent cache under ``folder``
    and reads them back from it: the seeds, methods and worker processes of one run then
    compile each program once. Programs that compiled in under ``min_compile_time_s`` seconds
    are not written."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def progress(iterable: Iterable, desc: str, total: int | None = None, **kw) -> Iterable:
    """A tqdm progress bar on process 0 (silent elsewhere and when ``CLJAX_NO_PROGRESS=1``)."""
    from tqdm.auto import tqdm

    disable = not is_primary() or os.environ.get("CLJAX_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, **kw)


def median_time(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in seconds; ``fn`` must block (``block_until_ready``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bar_chart(
    path: str | os.PathLike,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    *,
    errors: dict[str, Sequence[float]] | None = None,
    ylabel: str = "accuracy (%)",
    title: str = "",
) -> None:
    """A grouped bar chart saved as PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(series)
    x = np.arange(len(groups))
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(n, 2) * 0.5), 4))
    for i, (name, vals) in enumerate(series.items()):
        err = None if errors is None else errors.get(name)
        ax.bar(x + (i - (n - 1) / 2) * width, vals, width, label=name, yerr=err, capsize=2)
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tiny_clip_config(*, vision_layers: int) -> Any:
    """The ``CLIPConfig`` of a tiny CLIP: 32-pixel images in 8-pixel patches, width 32,
    ``vision_layers`` image-tower layers, a two-layer text tower over 99 tokens of at most
    16, projection 24 (the stand-in model of the CLIP presets' tests and of the CLIP model's
    own tests)."""
    from cljax.models import clip

    return clip.CLIPConfig(
        clip.CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_layers=vision_layers,
            num_heads=4,
        ),
        clip.CLIPTextConfig(
            vocab_size=99,
            max_position_embeddings=16,
            hidden_size=32,
            intermediate_size=48,
            num_layers=2,
            num_heads=4,
        ),
        projection_dim=24,
    )


def tiny_clip(rng: Any, *, vision_layers: int) -> tuple[Any, dict]:
    """A random tiny CLIP, ``(config, params)``: the stand-in checkpoint of the CLIP presets'
    tests (``clip-tiny``, ``mtil-tiny``).

    The model of :func:`tiny_clip_config`; every parameter drawn from
    ``rng.normal(scale=0.2)`` (a ``numpy.random.Generator``, which the caller may keep drawing
    from).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cljax.models import clip

    config = tiny_clip_config(vision_layers=vision_layers)
    shapes = jax.eval_shape(
        clip.CLIP(config).init,
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3)),
        jnp.zeros((1, 16), jnp.int32),
    )
    params = jax.tree.map(
        lambda s: np.asarray(rng.normal(scale=0.2, size=s.shape), s.dtype), shapes["params"]
    )
    return config, params


def random_task_vectors(params: Any, num_tasks: int, key: Any, *, dtype: Any = None) -> Any:
    """Stacked random task vectors of ``params``' shapes, ``[num_tasks, *shape]`` per leaf:
    ``1e-3·N(0, 1)`` draws in float32 (then cast to ``dtype``), one key per leaf split from
    ``key`` (the stand-in fine-tunings of the benchmarks, whose timings need only the shapes).
    """
    import jax

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    taus = [
        1e-3 * jax.random.normal(k, (num_tasks, *x.shape))
        for k, x in zip(keys, leaves, strict=True)
    ]
    if dtype is not None:
        taus = [t.astype(dtype) for t in taus]
    return jax.tree.unflatten(treedef, taus)


def compiled_memory_mib(compiled: Any) -> float | None:
    """XLA's static estimate of what a compiled program holds (arguments, outputs and
    temporaries, less what outputs alias), in MiB; ``None`` where the backend reports none."""
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    except Exception:  # noqa: BLE001  (not every backend reports it)
        return None
    return total / 2**20
