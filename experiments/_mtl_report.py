"""The report of ``experiments.mtl``: per data set the table of accuracies and Δm%, the table of
paired differences F-MTL minus base, the figure, and ``results.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from experiments import _common as C

if TYPE_CHECKING:
    from experiments.mtl import Config


def figure(path: Path, ds: str, rows: list[dict], paired: list[dict], cfg: Config) -> None:
    """Left: Δm% per aggregator, base and F-MTL (mean ± std over seeds). Right: the paired
    difference F − base in Δm points per aggregator, with its 95 % t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["method"]: r for r in rows}
    shown = [p["method"] for p in paired if p["method"] in by and "F-" + p["method"] in by]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(shown))
    for i, (lab, pre) in enumerate((("base", ""), ("F-MTL", "F-"))):
        vals = [by[pre + m]["_dm"] for m in shown]
        errs = [by[pre + m]["_dm_std"] for m in shown]
        a1.bar(x + (i - 0.5) * 0.4, vals, 0.4, yerr=errs, capsize=2, label=lab)
    a1.axhline(0, color="k", lw=0.5)
    a1.set_xticks(x, shown, rotation=30, ha="right")
    a1.set_ylabel("Δm% vs single-task (higher is better)")
    n = sorted({by[m]["seeds"] for m in shown} | {by["F-" + m]["seeds"] for m in shown})
    a1.set_title(f"{ds}: mean ± std over {'/'.join(map(str, n))} seeds")
    a1.legend(fontsize=8)
    ps = [p for p in paired if p["method"] in shown]
    mean = np.array([p["dm_diff"] for p in ps])
    lo = np.array([p["dm_ci"][0] for p in ps])
    hi = np.array([p["dm_ci"][1] for p in ps])
    a2.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=4)
    for i, p in enumerate(ps):
        a2.scatter(np.full(len(p["dm_diffs"]), i + 0.15), p["dm_diffs"], s=8, c="gray")
    a2.axhline(0, color="k", lw=0.5)
    a2.set_xlim(-0.5, len(shown) - 0.5)
    a2.set_xticks(x, shown, rotation=30, ha="right")
    a2.set_ylabel("F-MTL − base, Δm points (same seed)")
    a2.set_title("paired difference, mean and 95 % t-interval")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _paired_row(p: dict) -> dict:
    return {
        "method": p["method"],
        "seeds": len(p["seeds"]),
        "Δm diff": f"{p['dm_diff']:+.2f} [{p['dm_ci'][0]:+.2f}, {p['dm_ci'][1]:+.2f}]",
        "mean-acc diff": f"{p['acc_diff']:+.2f} [{p['acc_ci'][0]:+.2f}, {p['acc_ci'][1]:+.2f}]",
        "F better": f"{p['wins']}/{len(p['seeds'])}",
    }


def write_report(cfg: Config, results: dict, out: Path) -> None:
    """Prints each data set's tables, draws its figure ``mtl_<dataset>.png`` and writes
    ``results.json`` under ``out``."""
    for ds, rows in results["summary"].items():
        if not rows:
            continue
        cols = [c for c in rows[0] if not c.startswith("_") and c != "dataset"]
        print(
            f"\n### {ds} (test accuracy %, mean ± std over the finished seeds of {list(cfg.seeds)})\n"
        )
        print(C.format_table(rows, cols))
        paired = results["paired"][ds]
        if paired:
            print(f"\n### {ds}: F-MTL minus base, same seed (mean [95 % t-interval])\n")
            print(C.format_table([_paired_row(p) for p in paired], list(_paired_row(paired[0]))))
        if paired:  # nothing to draw without a finished base / F-variant pair
            figure(out / f"mtl_{ds}.png", ds, rows, paired, cfg)
    C.write_json(out / "results.json", results)
    print(f"\n{results['seconds']:.0f} s; results in {out}")
