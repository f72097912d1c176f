"""Pallas kernels for the hot loops of weight space, imported as ``cljax.kernels``.

Each op has a pure-jnp reference (the default on the CPU), a Pallas kernel (GPU through the
Triton lowering, TPU through Mosaic; interpret mode on the CPU), and a dispatcher
``implementation=None | "xla" | "pallas"``:

* :func:`weighted_sum` — θ0 + Σ_t c[t, b]·τ_t (task arithmetic, soups, aTLAS composition),
  differentiable (its coefficient gradient is :func:`block_dots`);
* :func:`block_dots` — ``<g_b, τ_t,b>`` for all T in one pass over g (aTLAS gradients);
* :func:`ties_threshold` — the TIES threshold, the k-th largest magnitude of each task
  vector over all its leaves, exactly and without a sort (a counting search in XLA, a radix
  select in Pallas, a histogram select in numpy for the streaming merge), with its rank
  :func:`keep_count`; :func:`kth_largest_magnitude` is the same op on a tree;
* :func:`ties` — TIES-merging, global scope: that threshold, then the elect +
  disjoint-merge pass fused.

A model's leaves share a few kernels (``BlockSizes.leaves_per_call``), and its small leaves
(``BlockSizes.xla_below``) go through one fused XLA computation: see ``_dispatch.multi_call``.
"""

from cljax.kernels._block_dots import block_dots, block_dots_leaf
from cljax.kernels._dispatch import BlockSizes
from cljax.kernels._dispatch import resolve as resolve_implementation
from cljax.kernels._ties_merge import kth_largest_magnitude, ties
from cljax.kernels._ties_threshold import keep_count, ties_threshold
from cljax.kernels._weighted_sum import weighted_sum, weighted_sum_leaf, weighted_sum_leaves

__all__ = [
    "BlockSizes",
    "block_dots",
    "block_dots_leaf",
    "keep_count",
    "kth_largest_magnitude",
    "resolve_implementation",
    "ties",
    "ties_threshold",
    "weighted_sum",
    "weighted_sum_leaf",
    "weighted_sum_leaves",
]
