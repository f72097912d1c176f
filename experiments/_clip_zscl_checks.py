"""The checks of the ZSCL recipe shared by every ZSCL preset (``experiments.clip_zscl`` and
``experiments.zscl``'s MiniCLIP preset): the methods and the terms each one uses, and the
settings rejected by name before any work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cljax._checks import check_int, check_scalar

if TYPE_CHECKING:
    from experiments.clip_zscl import ClipZsclConfig


METHODS = ("finetune", "lwf", "wise_ft", "we", "distill", "zscl")


def _validate(cfg: ClipZsclConfig) -> None:
    from cljax.data import DATASETS

    check_recipe(cfg)
    if len(cfg.tasks) < 2 or len(set(cfg.tasks)) != len(cfg.tasks):
        raise ValueError(f"tasks={cfg.tasks} must name at least two distinct datasets")
    for t in (*cfg.tasks, cfg.reference_images):
        if t not in DATASETS and not t.startswith("tfds:"):
            raise ValueError(f"unknown dataset {t!r}; known: {sorted(DATASETS)} or 'tfds:<name>'")
    check_int(cfg.eval_batch_size, name="eval_batch_size", where=cfg.preset, low=1)


def method_flags(method: str) -> dict[str, bool]:
    """Which terms and hand-overs ``method`` uses (shared by every ZSCL preset).

    Raises:
      ValueError: for a method not in :data:`METHODS`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {
        "lwf": method == "lwf",
        "wise": method == "wise_ft",
        "we": method in ("we", "zscl"),
        "distill": method in ("distill", "zscl"),
        "l2": method == "zscl",
    }


#: The recipe's real-valued settings: finite, and within these bounds.
_REAL = {
    "lr": (0.0, None),
    "fast_lr": (0.0, None),
    "label_smoothing": (0.0, 1.0),
    "temperature": (0.0, None),
    "distill_weight": (0.0, None),
    "l2_weight": (0.0, None),
    "wise_alpha": (0.0, 1.0),
}


_COUNTS = ("steps_per_task", "batch_size", "ref_batch_size", "avg_freq")


def check_recipe(cfg: Any) -> None:
    """Rejects a bad recipe before any work: real settings must be finite and in range
    (``lr=nan``, ``temperature=inf`` raise), counts positive integers, methods known and
    distinct.

    Raises:
      ValueError: naming the setting and its value.
    """
    for m in cfg.methods:
        method_flags(m)
    if len(set(cfg.methods)) != len(cfg.methods):  # one result and one checkpoint folder each
        raise ValueError(f"{cfg.preset}: methods={tuple(cfg.methods)} names a method twice")
    for name, (low, high) in _REAL.items():
        if hasattr(cfg, name):
            check_scalar(getattr(cfg, name), name=name, where=cfg.preset, low=low, high=high)
    if not cfg.temperature > 0:
        raise ValueError(f"{cfg.preset}: temperature={cfg.temperature!r} must be > 0")
    for name in _COUNTS:
        check_int(getattr(cfg, name), name=name, where=cfg.preset, low=1)
    check_int(cfg.warmup, name="warmup", where=cfg.preset, low=0)
