"""The TIES threshold: the k-th largest magnitude of each task vector, over all its leaves.

:mod:`.api` holds the op (:func:`ties_threshold`, its dispatcher, and :func:`keep_count`);
:mod:`.xla`, :mod:`.pallas` and :mod:`.host` its implementations.
"""

from cljax.kernels._ties_threshold.api import IMPLEMENTATIONS, keep_count, ties_threshold

__all__ = ["IMPLEMENTATIONS", "keep_count", "ties_threshold"]
