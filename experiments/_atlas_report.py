"""The report of ``experiments.atlas``: the tables (mean ± std over seeds), ``results.json``
and the figure."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from experiments._common import format_table, mean_std, write_json

if TYPE_CHECKING:
    from experiments.atlas import Config


def _pm(values, scale: float = 1.0) -> str:
    m, sd = mean_std([scale * v for v in values])
    return f"{m:.1f} ± {sd:.1f}"


def write_report(cfg: Config, units: dict, results: dict, out: Path) -> None:
    """Adds each part's per-seed results and the rows of its table to ``results`` and writes
    ``tables.md`` (mean ± std over seeds), ``results.json`` and ``atlas.png`` under ``out``."""
    ft_acc = units["finetuned"]
    seeds = list(cfg.seeds)
    tables = []
    pre_abs = 100 * float(np.mean(ft_acc["pretrained_test"]))
    pre_norm = 100 * float(
        np.mean(
            [a / f for a, f in zip(ft_acc["pretrained_test"], ft_acc["test"], strict=True) if f > 0]
        )
    )
    ft_abs = 100 * float(np.mean(ft_acc["test"]))
    # --- (1) and (5): task addition
    if "addition" in cfg.parts or "partitions" in cfg.parts:
        ta = units["task_arithmetic"]
        rows = [
            {
                "method": "pretrained",
                "absolute (%)": f"{pre_abs:.1f}",
                "normalized (%)": f"{pre_norm:.1f}",
                "coefficients": 0,
            },
            {
                "method": "fine-tuned (one model per task)",
                "absolute (%)": f"{ft_abs:.1f}",
                "normalized (%)": "100.0",
                "coefficients": "-",
            },
            {
                "method": f"task arithmetic (λ={ta['lambda']:.2f} on val)",
                "absolute (%)": f"{ta['absolute']:.1f}",
                "normalized (%)": f"{ta['normalized']:.1f}",
                "coefficients": 1,
            },
        ]
        variants = []
        if "addition" in cfg.parts:
            variants.append(("aTLAS", [units[f"addition/{s}"] for s in seeds]))
        if "partitions" in cfg.parts:
            variants += [
                (f"aTLAS×{k}", [units[f"partitions/{k}/{s}"] for s in seeds])
                for k in cfg.partitions
            ]
        for name, rs in variants:
            rows.append(
                {
                    "method": name,
                    "absolute (%)": _pm([r["absolute"] for r in rs]),
                    "normalized (%)": _pm([r["normalized"] for r in rs]),
                    "coefficients": rs[0]["coefficients"],
                }
            )
        results["addition"] = {"task_arithmetic": ta, **{n: rs for n, rs in variants}}
        tables.append(("Task addition (test, mean over tasks)", rows))
    # --- (2) negation
    if "negation" in cfg.parts:
        neg = [units[f"negation/{s}"] for s in seeds]
        rows = []
        for name in ("pretrained", "task arithmetic", "aTLAS"):
            per_seed = [r[name] for r in neg if r[name]]
            tgt = [100 * np.mean([a for a, _ in r]) for r in per_seed]
            ctl = [100 * np.mean([c for _, c in r]) for r in per_seed]
            rows.append(
                {"method": name, "target acc. (%) ↓": _pm(tgt), "control acc. (%)": _pm(ctl)}
            )
        results["negation"] = neg
        tables.append(("Task negation (test, mean over target tasks)", rows))
    # --- (3) few-shot
    if "few_shot" in cfg.parts:
        fs = [units[f"few_shot/{s}"] for s in seeds]
        rows = []
        for k in cfg.shots:
            row = {"shots / class": k, "pretrained": f"{pre_abs:.1f}"}
            for name in ("linear probe", "task arithmetic", "aTLAS"):
                row[name] = _pm([100 * np.mean(r[f"k={k}"][name]) for r in fs])
            rows.append(row)
        results["few_shot"] = fs
        tables.append(("Few-shot (test accuracy on the held-out task, mean over tasks)", rows))
    # --- (4) test-time adaptation
    if "tta" in cfg.parts:
        tta = [units[f"tta/{s}"] for s in seeds]
        rows = [
            {"method": name, "accuracy (%)": _pm([100 * np.mean(r[name]) for r in tta])}
            for name in ("pretrained", "entropy", "pseudo-label")
        ]
        results["tta"] = tta
        tables.append(("Test-time adaptation (unlabelled test inputs)", rows))

    text = "\n\n".join(f"### {title}\n\n{format_table(rows)}" for title, rows in tables)
    # The rows of tables.md as printed (mean ± std over seeds), beside the per-seed records.
    results["tables"] = dict(tables)
    print(text)
    (out / "tables.md").write_text(text + "\n")
    # Each unit's wall (/time_s) and CPU time (/cpu_s, where recorded) and, from run, the
    # run's own wall and CPU time (its workers' included).
    timing = {k: v for k, v in units.items() if k.endswith(("/time_s", "/cpu_s"))}
    results["timing_s"] = {**timing, **results.get("timing_s", {})}
    write_json(out / "results.json", results)
    _plot(out / "atlas.png", cfg, results, pre_abs)


def _plot(path: Path, cfg: Config, results: dict, pre_abs: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("addition", "few_shot", "negation", "tta") if p in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "addition":
            add = results["addition"]
            names = ["task arithmetic"] + [n for n in add if n != "task_arithmetic"]
            vals, errs = [add["task_arithmetic"]["normalized"]], [0.0]
            for n in names[1:]:
                m, s = mean_std([r["normalized"] for r in add[n]])
                vals.append(m)
                errs.append(s)
            ax.bar(range(len(names)), vals, yerr=errs, capsize=3, color="C0")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_ylim(min(vals) - 10, 101)
            ax.set_ylabel("normalized accuracy (%)")
            ax.set_title("task addition")
        elif panel == "few_shot":
            for j, name in enumerate(("linear probe", "task arithmetic", "aTLAS")):
                ms = [
                    mean_std([100 * np.mean(r[f"k={k}"][name]) for r in results["few_shot"]])
                    for k in cfg.shots
                ]
                ax.errorbar(
                    cfg.shots,
                    [m for m, _ in ms],
                    yerr=[s for _, s in ms],
                    label=name,
                    marker="o",
                    capsize=2,
                    color=f"C{j}",
                )
            ax.axhline(pre_abs, ls="--", color="gray", label="pretrained")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("shots per class")
            ax.set_ylabel("accuracy (%)")
            ax.set_title("few-shot, held-out task")
            ax.legend(fontsize=7)
        elif panel == "negation":
            names = ("pretrained", "task arithmetic", "aTLAS")
            for j, (idx, label) in enumerate(((0, "target ↓"), (1, "control"))):
                vals = [
                    np.mean(
                        [100 * np.mean([p[idx] for p in r[n]]) for r in results["negation"] if r[n]]
                    )
                    for n in names
                ]
                ax.bar(np.arange(3) + (j - 0.5) * 0.38, vals, 0.38, label=label)
            ax.set_xticks(range(3), names, rotation=30, ha="right")
            ax.set_ylabel("accuracy (%)")
            ax.set_title("task negation")
            ax.legend(fontsize=7)
        elif panel == "tta":
            names = ("pretrained", "entropy", "pseudo-label")
            ms = [mean_std([100 * np.mean(r[n]) for r in results["tta"]]) for n in names]
            ax.bar(range(3), [m for m, _ in ms], yerr=[s for _, s in ms], capsize=3, color="C2")
            ax.set_xticks(range(3), names, rotation=30, ha="right")
            ax.set_ylim(min(m for m, _ in ms) - 10, 100)
            ax.set_ylabel("accuracy (%)")
            ax.set_title("test-time adaptation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
