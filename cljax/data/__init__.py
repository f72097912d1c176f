"""Tasks and benchmarks: bundled offline sources (no downloads) and TFDS datasets."""

from cljax.data._benchmarks import MergingBenchmark, merging_benchmark
from cljax.data._continual import permuted_mnist, rotated_mnist, split_mnist
from cljax.data._corpus import CONCEPTS, CorpusExample, corpus_batch, corpus_example
from cljax.data._embedded import EMBEDDED_TASKS, EmbeddedBenchmark, embedded_benchmark
from cljax.data._mixture import (
    MixedBatcher,
    MixtureSchedule,
    mixed_batch_at,
    mixed_batch_counts,
    mixture_schedule,
)
from cljax.data._mtil import (
    MTIL_TASKS,
    MtilSequence,
    mtil_domain_tasks,
    mtil_pretraining_data,
    mtil_reference_images,
    mtil_sequence,
    render_strokes,
)
from cljax.data._multi_mnist import (
    MultiDigitImages,
    generate_multi_mnist,
    load_mnist_attributes,
    load_multi_mnist,
)
from cljax.data._multi_objects import (
    ATTRIBUTE_COLOURS,
    ATTRIBUTE_STYLES,
    GlyphAttributeImages,
    generate_glyph_attributes,
    generate_multi_shapes,
)
from cljax.data._sources import load_digits, load_mnist1d, load_mnist5k
from cljax.data._task import Task, split_train_val
from cljax.data._tfds import DATASETS, TFDSTask, clip_preprocess, tfds_task

__all__ = [
    "EMBEDDED_TASKS",
    "EmbeddedBenchmark",
    "embedded_benchmark",
    "CONCEPTS",
    "CorpusExample",
    "corpus_batch",
    "corpus_example",
    "DATASETS",
    "MTIL_TASKS",
    "MergingBenchmark",
    "MixedBatcher",
    "MixtureSchedule",
    "MtilSequence",
    "TFDSTask",
    "Task",
    "clip_preprocess",
    "load_digits",
    "load_mnist1d",
    "load_mnist5k",
    "load_mnist_attributes",
    "load_multi_mnist",
    "generate_multi_mnist",
    "MultiDigitImages",
    "ATTRIBUTE_COLOURS",
    "ATTRIBUTE_STYLES",
    "GlyphAttributeImages",
    "generate_glyph_attributes",
    "generate_multi_shapes",
    "merging_benchmark",
    "mixed_batch_at",
    "mixed_batch_counts",
    "mixture_schedule",
    "mtil_domain_tasks",
    "mtil_pretraining_data",
    "mtil_reference_images",
    "mtil_sequence",
    "permuted_mnist",
    "render_strokes",
    "rotated_mnist",
    "split_mnist",
    "split_train_val",
    "tfds_task",
]
