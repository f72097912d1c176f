"""The report of ``experiments.zscl``: the Transfer / Avg / Last table (mean ± std over seeds),
the accuracy matrices, the targets and the figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cljax import continual
from experiments import _common


def summarize(results: dict[str, Any]) -> tuple[str, list[dict]]:
    """The markdown table (mean ± std over seeds) and its rows."""
    zs = np.asarray(results["zero_shot"])
    zs_mat = np.tile(zs, (len(zs), 1))
    rows = [
        {
            "method": "zero-shot",
            "Transfer": f"{continual.mtil_transfer(zs_mat):.1f}",
            "Avg": f"{continual.mtil_avg(zs_mat):.1f}",
            "Last": f"{continual.mtil_last(zs_mat):.1f}",
        }
    ]
    for method, runs in results["runs"].items():
        row = {"method": method}
        for key, col in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
            m, s = _common.mean_std([r[key] for r in runs])
            row[col] = f"{m:.1f} ± {s:.1f}"
        rows.append(row)
    return _common.format_table(rows, ["method", "Transfer", "Avg", "Last"]), rows


def matrices(results: dict[str, Any]) -> str:
    """The seed-mean accuracy matrix of every method, as markdown tables."""
    names = results["tasks"]
    parts = []
    for method, runs in results["runs"].items():
        a = np.mean([r["accuracy"] for r in runs], axis=0)
        rows = [
            {"after": f"{j}:{names[j]}", **{n: float(a[j, i]) for i, n in enumerate(names)}}
            for j in range(len(names))
        ]
        parts.append(f"**{method}** (A[j, i], seed mean)\n\n" + _common.format_table(rows))
    return "\n\n".join(parts)


def _plots(results: dict[str, Any], out: Path, *, title: str) -> None:
    groups = list(results["runs"])
    series, errors = {}, {}
    for key, col in (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")):
        stats = [_common.mean_std([r[key] for r in results["runs"][m]]) for m in groups]
        series[col] = [s[0] for s in stats]
        errors[col] = [s[1] for s in stats]
    _common.bar_chart(out / "metrics.png", groups, series, errors=errors, title=title)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 2.8), squeeze=False)
    for ax, m in zip(axes[0], groups, strict=True):
        a = np.mean([r["accuracy"] for r in results["runs"][m]], axis=0)
        ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("evaluated task i", fontsize=7)
        ax.set_ylabel("after task j", fontsize=7)
        for (j, i), v in np.ndenumerate(a):
            ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w")
    fig.tight_layout()
    fig.savefig(out / "matrices.png", dpi=120)
    plt.close(fig)


def _targets(results: dict[str, Any]) -> list[dict]:
    """The issue's targets, checked on the seed means."""
    zs = np.asarray(results["zero_shot"])
    zs_transfer = continual.mtil_transfer(np.tile(zs, (len(zs), 1)))
    mean = {
        m: {k: float(np.mean([r[k] for r in runs])) for k in ("transfer", "last")}
        for m, runs in results["runs"].items()
    }
    rows = []
    if "zscl" in mean and "finetune" in mean:
        z, f = mean["zscl"], mean["finetune"]
        rows += [
            {
                "target": "Transfer >= fine-tuning's + 5",
                "measured": f"{z['transfer']:.1f} vs {f['transfer'] + 5:.1f}",
                "met": "yes" if z["transfer"] >= f["transfer"] + 5 else "no",
            },
            {
                "target": "Transfer >= 90 % of zero-shot's",
                "measured": f"{z['transfer']:.1f} vs {0.9 * zs_transfer:.1f}",
                "met": "yes" if z["transfer"] >= 0.9 * zs_transfer else "no",
            },
            {
                "target": "Last >= fine-tuning's",
                "measured": f"{z['last']:.1f} vs {f['last']:.1f}",
                "met": "yes" if z["last"] >= f["last"] else "no",
            },
        ]
        best = max(mean, key=lambda m: mean[m]["transfer"])
        rows.append(
            {
                "target": "ZSCL best on Transfer",
                "measured": f"best: {best} ({mean[best]['transfer']:.1f})",
                "met": "yes" if best == "zscl" else "no",
            }
        )
    return rows
