"""The ``Task``: a named classification problem with train/val/test arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

__all__ = ["Task", "split_train_val"]


def split_train_val(
    x: np.ndarray,
    y: np.ndarray,
    *,
    fraction: float = 0.1,
    max_val: int = 5000,
    seed: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Holds out a validation part of a train split (10 %, capped at 5 000, seed 0).

    The defaults are those of ``split_train_into_train_val`` in
    github.com/mlfoundations/task_vectors, which aTLAS (github.com/fredzzhang/atlas) shares:
    hyperparameters are chosen on this part, never on the test split.

    Raises:
      ValueError: if ``fraction`` is not in (0, 1) or a split would be empty.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{fraction=} must be in (0, 1)")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    n_val = min(int(round(n * fraction)), max_val)
    if n_val < 1 or n_val >= n:
        raise ValueError(f"cannot hold out {n_val} of {n} examples ({fraction=}, {max_val=})")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = perm[:n_val], perm[n_val:]
    return (x[train], y[train]), (x[val], y[val])


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A classification task: arrays for three splits and a deterministic batcher.

    Attributes:
      name: short identifier (``"rotated"``).
      classes: class names; ``len(classes)`` is the number of classes.
      x_train, y_train, x_val, y_val, x_test, y_test: numpy arrays; ``x`` float32
        (images ``[N, H, W, C]`` in [0, 1] or features), ``y`` int32 labels.
    """

    name: str
    classes: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self):
        for split in ("train", "val", "test"):
            x, y = self.split(split)
            if len(x) != len(y):
                raise ValueError(
                    f"task {self.name!r}: {split} has {len(x)} inputs but {len(y)} labels"
                )
            if len(y) and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(
                    f"task {self.name!r}: {split} labels span [{y.min()}, {y.max()}] but the task has "
                    f"{len(self.classes)} classes"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"{split=} must be 'train', 'val' or 'test'")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def steps_per_epoch(self, batch_size: int, split: str = "train") -> int:
        n = len(self.split(split)[1])
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        if batch_size > n:
            raise ValueError(
                f"task {self.name!r}: {batch_size=} exceeds the {n} examples of {split}"
            )
        return n // batch_size

    def batch_at(self, step: int, batch_size: int, *, seed: int = 0, split: str = "train") -> dict:
        """The batch a shuffled, drop-remainder iterator yields at global step ``step``.

        Random access makes the data position part of the step counter: a resumed run
        asks for the batch of its restored step and sees exactly the data it would have.
        """
        x, y = self.split(split)
        spe = self.steps_per_epoch(batch_size, split)
        epoch, i = divmod(int(step), spe)
        perm = np.random.default_rng([seed, epoch]).permutation(len(y))
        idx = np.sort(perm[i * batch_size : (i + 1) * batch_size])
        return {"x": x[idx], "y": y[idx]}

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        split: str = "train",
        start: int = 0,
        steps: int | None = None,
    ) -> Iterator[dict]:
        """Yields shuffled batches ``{"x", "y"}`` from global step ``start``; ``steps`` bounds the count."""
        s = start
        while steps is None or s < start + steps:
            yield self.batch_at(s, batch_size, seed=seed, split=split)
            s += 1

    def eval_batches(self, batch_size: int, split: str = "test") -> Iterator[dict]:
        """Yields the whole split in order, in batches (the last may be smaller)."""
        x, y = self.split(split)
        for i in range(0, len(y), batch_size):
            yield {"x": x[i : i + batch_size], "y": y[i : i + batch_size]}
