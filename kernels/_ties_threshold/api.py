"""The TIES threshold op: its API, the dispatcher over its implementations, and the keep count.

TIES-merging keeps, per task, the entries whose magnitude reaches the k-th largest magnitude
of the task vector (over all its leaves for the global scope, of one leaf for the per-leaf
scope). :func:`ties_threshold` returns that magnitude's float32 bit pattern per task, exactly
the value a full sort gives, from one of three implementations of the same contract:

* ``"xla"`` (:mod:`.xla`, the reference and the library's path on the CPU): a counting search
  over the bit patterns, a few reads of the leaves, no sort. Inside a trace it is one
  computation (a ``while_loop``); on concrete arrays its passes run from Python as small
  programs compiled once per leaf shape.
* ``"pallas"`` (:mod:`.pallas`, the default on GPU/TPU; interpret mode on the CPU): a radix
  select, 3 bits a pass, one kernel a pass.
* ``"numpy"`` (:mod:`.host`): a two-pass histogram select on the host, for the streaming merge
  of files too large for memory (never chosen by default).

The merging code (both scopes, eager and jitted), the fused merge :func:`cljax.kernels.ties`
and the streaming merge all take their threshold from here; :func:`keep_count` gives the rank.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax.kernels import _dispatch
from cljax.kernels._dispatch import BlockSizes
from cljax.kernels._ties_threshold import host, pallas, xla

__all__ = ["IMPLEMENTATIONS", "keep_count", "ties_threshold"]

#: The implementations :func:`ties_threshold` dispatches to.
IMPLEMENTATIONS = ("xla", "pallas", "numpy")

_SCOPES = ("global", "leaf")


def keep_count(density: float, n: int, *, scope: str) -> int:
    """The rank of the TIES threshold: entries with ``|τ| >=`` the k-th largest magnitude
    of ``n`` are kept (all of them where magnitudes tie); 0 keeps nothing.

    The two references count differently, and each scope follows its own:

    * ``scope="global"`` (the TIES paper's code, ``topk_values_mask``): the threshold is
      the ``(n - int(n·density))``-th *smallest* magnitude, i.e. the
      ``(int(n·density) + 1)``-th largest, so ``int(n·density) + 1`` entries are kept
      (one more than ``density·n``; at least 1, the largest, when ``int(n·density) == 0``).
      At ``density == 1`` the reference asks for the 0-th smallest and fails; here every
      entry is kept (k = n).
    * ``scope="leaf"`` (mergekit's ``magnitude`` sparsification, per tensor): the
      ``int(density·n)`` largest are kept, so a leaf with ``int(density·n) == 0`` keeps
      nothing (mergekit stops there with an assertion); ``density >= 1`` keeps all.

    Args:
      density: the fraction kept, in (0, 1].
      n: the number of entries the threshold is taken over (all merged leaves for
        ``"global"``, one leaf for ``"leaf"``).
      scope: ``"global"`` or ``"leaf"``.

    Returns:
      k in ``[0, n]`` (``[1, n]`` for ``"global"`` with ``n >= 1``).

    Raises:
      ValueError: for an unknown scope, density outside (0, 1] or a negative n.

    Example:
      >>> keep_count(0.2, 10, scope="global"), keep_count(0.2, 10, scope="leaf")
      (3, 2)

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS
      2023 (github.com/prateeky2806/ties-merging, ``src/utils/merge_utils.py``,
      ``topk_values_mask``); Goddard et al., "Arcee's MergeKit", 2024
      (github.com/arcee-ai/mergekit, ``mergekit/sparsify.py``, ``magnitude``).
    """
    if scope not in _SCOPES:
        raise ValueError(f"keep_count: {scope=} must be one of {_SCOPES}")
    if not isinstance(density, int | float) or not 0.0 < density <= 1.0:
        raise ValueError(f"keep_count: {density=} must be in (0, 1]")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"keep_count: {n=} must be a non-negative int")
    n = int(n)
    m = int(n * density)  # Python floats, as both references compute it
    if scope == "global":
        return min(m + 1, n)
    return min(m, n)


def _num_entries(leaf: Any) -> int:
    """Entries per task of a stacked ``(T, *shape)`` leaf or a sequence of T arrays (from
    the shapes: no slice of a device array is taken)."""
    if isinstance(leaf, list | tuple):
        return math.prod(np.shape(leaf[0]))
    return math.prod(leaf.shape[1:])


def ties_threshold(
    leaves: Sequence[Any],
    k: int | jax.Array,
    *,
    num_tasks: int | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array | np.ndarray:
    """The float32 bit pattern of the k-th largest ``|τ_t|`` over all leaves, per task.

    Args:
      leaves: per leaf, a stacked ``(T, *shape)`` array or a sequence of T arrays; all
        leaves together form each task's vector of N entries. ``"pallas"`` takes stacked
        arrays; ``"numpy"`` takes sequences of T numpy arrays (a sequence whose items are
        read on access, as the streaming merge passes, is iterated twice).
      k: the rank, ``1 <= k <= N`` (traced under ``"xla"`` and ``"pallas"``: one
        compilation serves every k; an int for ``"numpy"``).
      num_tasks: T (inferred from the first leaf if omitted).
      implementation: ``None`` (``"pallas"`` on GPU/TPU, ``"xla"`` on the CPU), ``"xla"``,
        ``"pallas"`` (interpret mode on the CPU) or ``"numpy"``.
      block_sizes: Pallas tile sizes.

    Returns:
      ``(T,)`` uint32 patterns (a numpy array for ``"numpy"``);
      ``lax.bitcast_convert_type(out, jnp.float32)`` is the threshold. Every implementation
      gives the value a full sort of the magnitudes gives, except below the smallest normal
      float32, where compares flush subnormals on CPUs and accelerators: there ``"xla"``
      reports 0 and ``"pallas"`` the pattern its flushed compares reach (a threshold that
      keeps the same entries). Inputs must be finite.

    Raises:
      ValueError: for an unknown implementation, an empty ``leaves``, N beyond the
        implementation's counters (``"pallas"``: 2**31 - 1 entries a task; ``"xla"``: 2**32),
        or, for a concrete k, k outside ``[1, N]``.

    Example:
      >>> bits = ties_threshold([jnp.array([[3.0, -5.0, 1.0]])], 2)
      >>> jax.lax.bitcast_convert_type(bits, jnp.float32)
      Array([3.], dtype=float32)
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"ties_threshold: {implementation=} must be None or one of {IMPLEMENTATIONS}"
        )
    if not leaves:
        raise ValueError("ties_threshold: leaves is empty; need at least one leaf")
    if implementation == "numpy":  # N is counted in the first pass (leaves may be files)
        if not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"ties_threshold: {k=} must be an int >= 1")
        t = num_tasks or len(leaves[0])
        return host.kth_largest_bits(leaves, int(k), num_tasks=t)
    n = sum(_num_entries(x) for x in leaves)
    if isinstance(k, numbers.Integral) and not 1 <= int(k) <= n:
        raise ValueError(f"ties_threshold: {k=} must be in [1, N={n}]")
    impl = _dispatch.resolve(implementation, where="ties_threshold")
    if impl == "pallas":
        if n > pallas.MAX_COUNT:
            raise ValueError(
                f"ties_threshold: N={n} entries per task overflow the int32 counts of 'pallas'"
            )
        bs = _dispatch.block_sizes_or_default(block_sizes)
        stacked = [jnp.stack(x) if isinstance(x, list | tuple) else x for x in leaves]
        return pallas.kth_largest_bits(stacked, jnp.asarray(k, jnp.int32), bs=bs)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((leaves, k)))
    if traced:  # one computation
        return xla.kth_largest_bits(leaves, k, num_tasks=num_tasks)
    return xla.kth_largest_bits_driven(leaves, k, num_tasks=num_tasks)
