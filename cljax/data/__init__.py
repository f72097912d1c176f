"""Tasks and benchmarks: bundled offline sources (no downloads)."""

from cljax.data._multi_mnist import load_mnist_attributes, load_multi_mnist
from cljax.data._sources import load_digits, load_mnist1d, load_mnist5k
from cljax.data._task import Task, split_train_val

__all__ = ["Task", "load_digits", "load_mnist1d", "load_mnist5k", "split_train_val"]
from cljax.data._continual import permuted_mnist, rotated_mnist, split_mnist  # noqa: E402

__all__ += ["permuted_mnist", "rotated_mnist", "split_mnist"]
__all__ += ["load_mnist_attributes", "load_multi_mnist"]
