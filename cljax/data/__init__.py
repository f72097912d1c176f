"""Tasks and benchmarks: bundled offline sources (no downloads)."""

from cljax.data._sources import load_digits, load_mnist1d, load_mnist5k
from cljax.data._task import Task, split_train_val
from cljax.data._tfds import DATASETS, TFDSTask, clip_preprocess, tfds_task

__all__ = [
    "DATASETS",
    "TFDSTask",
    "clip_preprocess",
    "tfds_task",
    "Task",
    "load_digits",
    "load_mnist1d",
    "load_mnist5k",
    "split_train_val",
]
