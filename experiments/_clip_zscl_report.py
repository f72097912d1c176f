"""The report of ``experiments.clip_zscl``: the Transfer / Avg / Last table and the accuracy
matrices' figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cljax import continual
from experiments import _common


def summarize(results: dict[str, Any]) -> str:
    """The markdown table of Transfer / Avg / Last per method, zero-shot first."""
    zs = np.asarray(results["zero_shot"])
    zs_mat = np.tile(zs, (len(zs), 1))
    rows = [
        {
            "method": "zero-shot",
            "Transfer": continual.mtil_transfer(zs_mat),
            "Avg": continual.mtil_avg(zs_mat),
            "Last": continual.mtil_last(zs_mat),
        }
    ]
    for method, r in results["runs"].items():
        rows.append(
            {"method": method, "Transfer": r["transfer"], "Avg": r["avg"], "Last": r["last"]}
        )
    return _common.format_table(rows, ["method", "Transfer", "Avg", "Last"])


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = results["tasks"]
    fig, axes = plt.subplots(1, len(runs), figsize=(3.4 * len(runs), 3.2), squeeze=False)
    for ax, (method, r) in zip(axes[0], runs.items(), strict=True):
        ax.imshow(np.asarray(r["accuracy"]), vmin=0, vmax=100, cmap="viridis")
        ax.set_title(f"{method}: Last {r['last']:.1f}", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.set_xlabel("evaluated on", fontsize=7)
        ax.set_ylabel("after training on", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
