"""The weighted sum θ0 + Σ_t c[t, b]·τ_t (task arithmetic, soups, aTLAS composition).

:mod:`.api` holds the op (:func:`weighted_sum` and its per-leaf forms, the dispatcher and the
one ``custom_vjp``); :mod:`.xla` and :mod:`.pallas` its implementations.
"""

from cljax.kernels._weighted_sum.api import weighted_sum, weighted_sum_leaf, weighted_sum_leaves

__all__ = ["weighted_sum", "weighted_sum_leaf", "weighted_sum_leaves"]
