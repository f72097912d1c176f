"""Block dot products ``<g_b, τ_t,b>`` for all T task vectors (the aTLAS coefficient gradient).

:mod:`.api` holds the op (:func:`block_dots`, :func:`block_dots_leaf`, the dispatcher and the
one ``custom_vjp``); :mod:`.xla` and :mod:`.pallas` its implementations.
"""

from cljax.kernels._block_dots.api import block_dots, block_dots_leaf

__all__ = ["block_dots", "block_dots_leaf"]
