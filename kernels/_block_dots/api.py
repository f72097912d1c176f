"""The block-dots op: every ``<g_b, τ_t,b>`` in one pass over ``g`` (the aTLAS coefficient
gradient).

The API (:func:`block_dots`, :func:`block_dots_leaf`), the dispatcher over the
implementations, and the op's one ``custom_vjp`` (its cotangent with respect to ``g`` is a
weighted sum, the op this one transposes):

* ``"xla"`` (:mod:`.xla`, the reference and the library's path on the CPU): one fused
  multiply-reduce per leaf;
* ``"pallas"`` (:mod:`.pallas`, the default on GPU/TPU; interpret mode on the CPU): a kernel
  that reads each tile of ``g`` once beside the T tiles of τ and writes per-block partial sums.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from cljax import tree as ct
from cljax.kernels import _dispatch
from cljax.kernels._block_dots import pallas, xla
from cljax.kernels._dispatch import BlockSizes

__all__ = ["block_dots", "block_dots_leaf", "forward", "per_leaf"]


def forward(gs, taus, groups, num_groups, impl, bs, accs=None):
    """Every leaf's ``<g, τ_t>`` (``[T]``, or ``[T, K]`` with groups): lists in, list out.

    ``accs``: per leaf, the accumulation dtype of the XLA reference (default float32; the
    weighted sum's backward passes float64 for float64 coefficients). The Pallas kernels
    accumulate in float32.
    """
    if impl == "pallas":
        return pallas.block_dots_leaves(gs, taus, groups, num_groups, bs)
    accs = [jnp.float32] * len(gs) if accs is None else accs
    return [xla.leaf(*a) for a in zip(gs, taus, groups, num_groups, accs, strict=True)]


@functools.cache
def _op(impl: str, bs: BlockSizes, num_groups: tuple[int | None, ...]):
    """A custom-VJP ``(gs, τs, groups) -> dots`` over tuples of leaves."""
    # The two ops are each other's transposes (the weighted sum's api imports this module).
    from cljax.kernels._weighted_sum import api as weighted_sum_api
    from cljax.kernels._weighted_sum import xla as weighted_sum_xla

    @jax.custom_vjp
    def op(gs, taus, groups):
        return tuple(forward(gs, taus, groups, num_groups, impl, bs))

    def fwd(gs, taus, groups):
        gv, tv = [x.value for x in gs], [x.value for x in taus]
        grv = [None if x is None else x.value for x in groups]
        out = tuple(forward(gv, tv, grv, num_groups, impl, bs))
        # Only what the backward needs; zero-size arrays carry the dtypes of what is asked.
        res = (
            tuple(g if t.perturbed else None for g, t in zip(gv, taus, strict=True)),
            tuple(t if g.perturbed else None for t, g in zip(tv, gs, strict=True)),
            tuple(grv),
            tuple(jnp.zeros((0,), g.value.dtype) if g.perturbed else None for g in gs),
            tuple(jnp.zeros((0,), t.value.dtype) if t.perturbed else None for t in taus),
        )
        return out, res

    def bwd(res, cts):
        gv, tv, grv, g_flags, tau_flags = res
        cts = [jnp.zeros(c.shape, jnp.float32) if isinstance(c, SymbolicZero) else c for c in cts]
        cts = [jnp.asarray(c, jnp.float32) for c in cts]
        dgs = [None] * len(cts)
        want = [j for j, f in enumerate(g_flags) if f is not None]
        if want:  # d<g, τ_t>/dg = Σ_t ct[t] τ_t: a weighted sum, same dispatch
            pick = lambda xs: [xs[j] for j in want]  # noqa: E731
            ys = weighted_sum_api.forward(
                None, pick(tv), pick(cts), pick(grv), pick(num_groups), impl, bs
            )
            for j, y in zip(want, ys, strict=True):
                dgs[j] = y.astype(g_flags[j].dtype)
        dtaus = []
        for f, g, c, gr in zip(tau_flags, gv, cts, grv, strict=True):
            if f is None:
                dtaus.append(None)
                continue
            g32 = g.astype(jnp.float32)  # d<g, τ_t>/dτ_t = ct[t] g
            rows = [weighted_sum_xla.per_entry(c[t], gr) * g32 for t in range(len(c))]
            dtaus.append(jnp.stack(rows).astype(f.dtype))
        return tuple(dgs), tuple(dtaus), tuple(None for _ in grv)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


def _apply(gs, taus, groups, num_groups, implementation, block_sizes, where) -> list[jax.Array]:
    for g, t, gr, k in zip(gs, taus, groups, num_groups, strict=True):
        _check_leaf(g, t, gr, k, where)
    impl = _dispatch.resolve(implementation, where=where)
    bs = _dispatch.block_sizes_or_default(block_sizes)
    return list(_op(impl, bs, tuple(num_groups))(tuple(gs), tuple(taus), tuple(groups)))


def _check_leaf(g, tau, groups, num_groups, where):
    if tau.ndim < 1 or tuple(tau.shape[1:]) != tuple(g.shape):
        raise ValueError(
            f"{where}: task vectors of shape {tuple(tau.shape)} do not stack leaves of shape "
            f"{tuple(g.shape)} (expected [T, *shape])"
        )
    if groups is None:
        if num_groups is not None:
            raise ValueError(f"{where}: {num_groups=} given without group ids")
        return
    if num_groups is None or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{where}: {num_groups=} must be a positive int when groups are given")
    if tuple(groups.shape) != tuple(g.shape):
        raise ValueError(
            f"{where}: group ids of shape {tuple(groups.shape)} for a leaf of shape "
            f"{tuple(g.shape)}"
        )
    if not jnp.issubdtype(groups.dtype, jnp.integer):
        raise ValueError(f"{where}: group ids must be integers, got {groups.dtype}")


def block_dots_leaf(
    g: jax.Array,
    tau: jax.Array,
    groups: jax.Array | None = None,
    *,
    num_groups: int | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """``<g, τ_t>`` for every task t (or per group of entries), all T in one pass over ``g``.

    Args:
      g: one leaf, e.g. ``dL/dθ_b`` for a composed block.
      tau: the stacked task vectors of that leaf, ``[T, *g.shape]`` (any float dtype).
      groups: optional integer group id in ``[0, num_groups)`` per entry of ``g`` (aTLAS×K).
      num_groups: K, required with ``groups``.
      implementation: ``None`` (Pallas on GPU/TPU, XLA on the CPU), ``"xla"`` or
        ``"pallas"`` (interpret mode on the CPU).
      block_sizes: tile sizes for the Pallas kernel (default per platform).

    Returns:
      float32 ``[T]``, or ``[T, K]`` with groups; accumulated in float32.

    Raises:
      ValueError: on mismatched shapes, non-integer group ids, a missing ``num_groups``,
        or an unknown implementation.

    Example:
      >>> block_dots_leaf(jnp.ones(5), jnp.ones((3, 5)))
      Array([5., 5., 5.], dtype=float32)

    References:
      Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic
      Scaling", NeurIPS 2024: ``dL/dΛ[t, b] = <dL/dθ_b, τ_{t, b}>``.
    """
    g, tau = jnp.asarray(g), jnp.asarray(tau)
    groups = None if groups is None else jnp.asarray(groups)
    return _apply([g], [tau], [groups], [num_groups], implementation, block_sizes, "block_dots")[0]


def block_dots(
    grads: ct.PyTree,
    task_vectors: Sequence[ct.PyTree] | ct.PyTree,
    *,
    groups: Sequence[jax.Array | None] | None = None,
    num_groups: int | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> ct.PyTree:
    """Per leaf, ``<g_b, τ_t,b>`` for all T task vectors: the aTLAS coefficient gradient.

    Args:
      grads: a tree of cotangents ``dL/dθ`` (one leaf per block).
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees.
      groups: optional, per leaf in flattening order, an integer array of group ids or
        ``None`` (that leaf then gives ``[T]``); see ``atlas.partition_masks``.
      num_groups: K for the grouped leaves.
      implementation: ``None`` | ``"xla"`` | ``"pallas"`` (see :func:`block_dots_leaf`).
      block_sizes: Pallas tile sizes.

    Returns:
      A tree of ``grads``' structure with float32 leaves ``[T]`` (or ``[T, K]``).

    Raises:
      ValueError: on mismatched trees (first differing path named) or bad arguments.

    Example:
      >>> dots = block_dots(jax.grad(loss)(theta), task_vectors)

    References:
      Zhang et al., aTLAS, NeurIPS 2024.
    """
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    ct.check_same_structure(grads, tvs, names=("grads", "task_vectors"), b_leading=(t,))
    leaves, treedef = jax.tree.flatten(grads)
    grp = per_leaf(groups, len(leaves), "block_dots")
    out = _apply(
        [jnp.asarray(g) for g in leaves],
        [jnp.asarray(t) for t in jax.tree.leaves(tvs)],
        [None if gi is None else jnp.asarray(gi) for gi in grp],
        [None if gi is None else num_groups for gi in grp],
        implementation,
        block_sizes,
        "block_dots",
    )
    return jax.tree.unflatten(treedef, out)


def per_leaf(groups, n, where):
    if groups is None:
        return [None] * n
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{where}: groups has {len(groups)} entries for {n} leaves")
    return groups
