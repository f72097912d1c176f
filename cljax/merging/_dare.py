"""DARE: drop and rescale task-vector entries (Yu et al., 2024)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax.merging import _common

__all__ = ["dare"]


def dare(
    task_vectors: Sequence[ct.Params] | ct.Params,
    *,
    drop_rate: float,
    key: jax.Array | int,
    rescale: bool = True,
    rules: ct.Rules | None = None,
):
    """Drops each task-vector entry with probability p and rescales the rest by 1/(1−p).

    DARE is a pre-processing step: merge its output with :func:`task_arithmetic`,
    :func:`ties` or :func:`average`. Masks are independent per task and per leaf: the key of
    task ``t`` and leaf ``path`` is ``fold_in(fold_in(key, t), crc32(path))``, so a merge is
    reproducible and does not depend on the order in which leaves are visited. An entry is
    dropped when 32 random bits fall below ``round(p·2³²)`` (p quantised to 2⁻³²).
    Kept entries are multiplied by ``1/(1−p)`` in float32, then cast back to the storage
    dtype: for p near 1 the factor is large. DARE fails when deltas are large (continued
    pre-training, large learning rates), as its authors note.

    Args:
      task_vectors: T task vectors, a list of trees or one stacked tree (leading axis T).
      drop_rate: p in [0, 1).
      key: a JAX PRNG key (``jax.random.key`` or ``PRNGKey``) or an int seed.
      rescale: multiply kept entries by 1/(1−p) (DARE). ``False`` gives "DropOnly".
      rules: optional path rules ``[(regex, bool), ...]``; excluded and integer leaves pass
        through unchanged (e.g. ``[(".*classifier.*", False)]`` as MergeLM does for heads).

    Returns:
      The processed task vectors as one stacked tree (leading axis T), dtypes preserved.

    Raises:
      ValueError: for ``drop_rate`` outside [0, 1), an empty list, or mismatched trees.

    Example:
      >>> sparse = dare([tau_a, tau_b], drop_rate=0.9, key=jax.random.key(0))
      >>> merged = task_arithmetic(theta0, sparse, scale=0.3)

    References:
      Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
      Models as a Free Lunch", ICML 2024.
    """
    if not isinstance(drop_rate, int | float) or not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"dare: {drop_rate=} must be in [0, 1)")
    if isinstance(key, int):
        key = jax.random.key(key)
    reference = _common.reference_of(task_vectors)
    ts = _common.read_task_set(task_vectors, reference, ref_name="task_vectors[0]")
    mask = tuple(_common.participating(reference, rules))
    hashes = tuple(_common.path_hash(p) for p in ct.paths(reference))
    treedef = jax.tree.structure(reference)
    out = _dare_core(
        ts.leaves,
        key,
        mask=mask,
        hashes=hashes,
        num_tasks=ts.num_tasks,
        drop_rate=float(drop_rate),
        rescale=rescale,
    )
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("mask", "hashes", "num_tasks", "drop_rate", "rescale"))
def _dare_core(tv_leaves, key, *, mask, hashes, num_tasks, drop_rate, rescale):
    ts = _common.TaskSet(tv_leaves, num_tasks)
    cutoff = jnp.uint32(min(round(drop_rate * 2.0**32), 2**32 - 1))
    out = []
    for i, (m, h) in enumerate(zip(mask, hashes, strict=True)):
        if not m:
            out.append(ts.stacked(i))
            continue
        # One batched draw per leaf for all T tasks (the same bits as T separate draws; one
        # random-bits computation per leaf instead of T keeps XLA:CPU compiles short).
        x = ts.stacked(i)
        keys = jax.vmap(lambda t, h=h: jax.random.fold_in(jax.random.fold_in(key, t), h))(
            jnp.arange(num_tasks, dtype=jnp.uint32)
        )
        bits = jax.vmap(lambda k, s=x.shape[1:]: jax.random.bits(k, s, jnp.uint32))(keys)
        v = _common.accum(x)
        v = v * (1.0 / (1.0 - drop_rate)) if rescale else v
        out.append(jnp.where(bits >= cutoff, v, 0).astype(x.dtype))
    return out
