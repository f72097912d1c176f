"""Tasks and benchmarks: bundled offline sources (no downloads)."""

from cljax.data._benchmarks import MergingBenchmark, merging_benchmark
from cljax.data._sources import load_digits, load_mnist1d, load_mnist5k
from cljax.data._task import Task, split_train_val

__all__ = ["Task", "load_digits", "load_mnist1d", "load_mnist5k", "split_train_val"]
__all__ += ["MergingBenchmark", "merging_benchmark"]
from cljax.data._continual import permuted_mnist, rotated_mnist, split_mnist  # noqa: E402

__all__ += ["permuted_mnist", "rotated_mnist", "split_mnist"]

from cljax.data._mtil import (  # noqa: E402
    MTIL_TASKS,
    MtilSequence,
    mtil_domain_tasks,
    mtil_pretraining_data,
    mtil_reference_images,
    mtil_sequence,
    render_strokes,
)

__all__ += [
    "MTIL_TASKS",
    "MtilSequence",
    "mtil_domain_tasks",
    "mtil_pretraining_data",
    "mtil_reference_images",
    "mtil_sequence",
    "render_strokes",
]
