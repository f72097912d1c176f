"""The weighted-sum op: θ0 + Σ_t c[t, b]·τ_t in one pass (task arithmetic, soups, aTLAS).

The API (:func:`weighted_sum`, :func:`weighted_sum_leaf`, :func:`weighted_sum_leaves`), the
dispatcher over the implementations, and the op's one ``custom_vjp``:

* ``"xla"`` (:mod:`.xla`, the reference and the library's path on the CPU): one fused pass
  per leaf, tuned for the aTLAS training step (see the barriers there and in the backward);
* ``"pallas"`` (:mod:`.pallas`, the default on GPU/TPU; interpret mode on the CPU): a kernel
  that reads θ0 and the T task vectors once and writes the leaf once.

Gradients: the cotangent of the coefficients is ``<dL/dθ_b, τ_t,b>``, i.e.
:func:`cljax.kernels.block_dots` through the same dispatcher; those of θ0 and of τ are
computed only when they are differentiated (``symbolic_zeros``).

This is the library's one weighted sum: :func:`cljax.merging.task_arithmetic` (one λ for
every task), :func:`cljax.merging.apply` (one task vector) and
:func:`cljax.merging.atlas.compose` (one coefficient per block, or per partition group) call
it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from cljax import tree as ct
from cljax.kernels import _dispatch
from cljax.kernels._block_dots import api as block_dots_api
from cljax.kernels._dispatch import BlockSizes
from cljax.kernels._weighted_sum import pallas, xla

__all__ = ["forward", "weighted_sum", "weighted_sum_leaf", "weighted_sum_leaves"]


def forward(bases, taus, coeffs, groups, num_groups, impl, bs, out_dtypes=None):
    """Every leaf's θ0 + Σ_t c·τ_t (``bases`` may be ``None``): lists in, list out."""
    if out_dtypes is None:
        out_dtypes = [t.dtype for t in taus] if bases is None else [b.dtype for b in bases]
    if impl == "pallas":
        return pallas.weighted_sum_leaves(bases, taus, coeffs, groups, num_groups, out_dtypes, bs)
    bases = [None] * len(taus) if bases is None else bases
    return [
        xla.leaf(b, t, c, g, o)
        for b, t, c, g, o in zip(bases, taus, coeffs, groups, out_dtypes, strict=True)
    ]


@functools.cache
def _op(impl: str, bs: BlockSizes, num_groups: tuple[int | None, ...], has_base: bool):
    """A custom-VJP ``(θ0s | None, τs, cs, groups) -> θs`` over tuples of leaves."""

    @jax.custom_vjp
    def op(bases, taus, coeffs, groups):
        return tuple(forward(bases, taus, coeffs, groups, num_groups, impl, bs))

    def fwd(bases, taus, coeffs, groups):
        b = None if bases is None else [x.value for x in bases]
        tv, cv = [x.value for x in taus], [x.value for x in coeffs]
        gv = [None if x is None else x.value for x in groups]
        out = tuple(forward(b, tv, cv, gv, num_groups, impl, bs))
        flag = lambda x: jnp.zeros((0,), x.value.dtype) if x.perturbed else None  # noqa: E731
        res = (
            tuple(tv),
            tuple(cv),
            tuple(gv),
            None if bases is None else tuple(flag(x) for x in bases),
            tuple(flag(x) for x in taus),
            tuple(x.perturbed for x in coeffs),
        )
        return out, res

    def bwd(res, gs):
        tv, cv, gv, base_flags, tau_flags, c_perturbed = res
        gs = [  # a SymbolicZero's aval is a ShapedArray (typed as the AbstractValue base)
            jnp.zeros(t.shape[1:], cast(ShapedArray, g.aval).dtype)
            if isinstance(g, SymbolicZero)
            else g
            for g, t in zip(gs, tv, strict=True)
        ]
        dcs = [None] * len(tv)
        want = [j for j, p in enumerate(c_perturbed) if p]
        if want:  # dL/dc[t, k] = <g, τ_t> over the entries of group k: block_dots
            pick = lambda xs: [xs[j] for j in want]  # noqa: E731
            taus = pick(tv)
            accs = None
            if impl == "xla":
                # The barrier stops XLA:CPU from sharing the forward pass's widening of a
                # half-precision τ with this pass, which would hold a float32 copy of every
                # task vector through the model's backward pass.
                taus = [jax.lax.optimization_barrier(t) for t in taus]
                accs = [xla.accum_dtype(gs[j].dtype, cv[j].dtype) for j in want]
            dots = block_dots_api.forward(
                pick(gs), taus, pick(gv), pick(num_groups), impl, bs, accs=accs
            )
            for j, d in zip(want, dots, strict=True):
                dcs[j] = d.astype(cv[j].dtype)
        dbases = None
        if base_flags is not None:
            dbases = tuple(
                None if f is None else g.astype(f.dtype)
                for f, g in zip(base_flags, gs, strict=True)
            )
        dtaus = []
        for f, g, t, c, gi in zip(tau_flags, gs, tv, cv, gv, strict=True):
            if f is None:  # exact, but T copies of the leaf: only when asked for
                dtaus.append(None)
                continue
            acc = xla.accum_dtype(g.dtype, c.dtype)
            ca, ga = c.astype(acc), g.astype(acc)
            rows = [xla.per_entry(ca[i], gi) * ga for i in range(t.shape[0])]
            dtaus.append(jnp.stack(rows).astype(f.dtype))
        return dbases, tuple(dtaus), tuple(dcs), tuple(None for _ in gv)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


def _apply(bases, taus, coeffs, groups, implementation, block_sizes, where):
    """Validates every leaf, then runs them through the custom-VJP op.

    Pallas: all leaves through one op, so they share a few kernels (``leaves_per_call``).
    XLA: one op per leaf. Autodiff then emits each leaf's backward where that leaf's
    cotangent is complete, inside the model's backward pass, and XLA can free the cotangent
    there; one op for all leaves would hold every leaf's cotangent until the last one is
    ready (a leaf-sized float32 temporary more per partitioned leaf on XLA:CPU, where the
    grouped coefficient gradient is a loop). A coefficient shared by several leaves (an
    aTLAS group) sums their cotangents in the order autodiff sums separate uses.
    """
    num_groups = tuple(
        _check_leaf(b, t, c, g, where)
        for b, t, c, g in zip(bases or [None] * len(taus), taus, coeffs, groups, strict=True)
    )
    impl = _dispatch.resolve(implementation, where=where)
    bs = _dispatch.block_sizes_or_default(block_sizes)
    if impl == "pallas":
        chunks = [list(range(len(taus)))]
    else:
        chunks = [[j] for j in range(len(taus))]
    out = []
    for idx in chunks:
        op = _op(impl, bs, tuple(num_groups[j] for j in idx), bases is not None)
        out += op(
            None if bases is None else tuple(bases[j] for j in idx),
            tuple(taus[j] for j in idx),
            tuple(coeffs[j] for j in idx),
            tuple(groups[j] for j in idx),
        )
    return out


def _check_leaf(base, tau, coeffs, groups, where) -> int | None:
    if tau.ndim < 1:
        raise ValueError(f"{where}: task vectors must be stacked [T, *shape], got a scalar")
    if base is not None and tuple(tau.shape[1:]) != tuple(base.shape):
        raise ValueError(
            f"{where}: task vectors of shape {tuple(tau.shape)} do not stack leaves of shape "
            f"{tuple(base.shape)} (expected [T, *shape])"
        )
    t = tau.shape[0]
    if not ct.is_float(coeffs):
        raise ValueError(f"{where}: coefficients must be floating point, got {coeffs.dtype}")
    if groups is None:
        if tuple(coeffs.shape) != (t,):
            raise ValueError(
                f"{where}: coefficients of shape {tuple(coeffs.shape)}, expected ({t},)"
            )
        return None
    if coeffs.ndim != 2 or coeffs.shape[0] != t:
        raise ValueError(
            f"{where}: with group ids, coefficients must be [T, K] with T={t}, got "
            f"{tuple(coeffs.shape)}"
        )
    if tuple(groups.shape) != tuple(tau.shape[1:]):
        raise ValueError(
            f"{where}: group ids of shape {tuple(groups.shape)} for a leaf of shape "
            f"{tuple(tau.shape[1:])}"
        )
    if not jnp.issubdtype(groups.dtype, jnp.integer):
        raise ValueError(f"{where}: group ids must be integers, got {groups.dtype}")
    return int(coeffs.shape[1])


def weighted_sum_leaf(
    base: jax.Array | None,
    tau: jax.Array,
    coeffs: ArrayLike,
    groups: jax.Array | None = None,
    *,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """One leaf of θ0 + Σ_t c[t]·τ_t (or c[t, groups]·τ_t), accumulated in float32.

    Args:
      base: θ0's leaf, or ``None`` for the plain weighted sum Σ_t c[t]·τ_t (soups).
      tau: the stacked task vectors of the leaf, ``[T, *shape]``, any float dtype.
      coeffs: ``[T]``, or ``[T, K]`` with group ids.
      groups: optional integer group id in ``[0, K)`` per entry (aTLAS×K).
      implementation: ``None`` (Pallas on GPU/TPU, XLA on the CPU), ``"xla"`` or
        ``"pallas"`` (interpret mode on the CPU).
      block_sizes: Pallas tile sizes (default per platform).

    Returns:
      The leaf, in θ0's dtype (τ's dtype without θ0).

    Raises:
      ValueError: on mismatched shapes, non-float coefficients, non-integer group ids or an
        unknown implementation.

    Example:
      >>> weighted_sum_leaf(jnp.zeros(3), jnp.ones((2, 3)), jnp.array([0.5, 0.25]))
      Array([0.75, 0.75, 0.75], dtype=float32)

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023; Zhang et al.,
      "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling",
      NeurIPS 2024 (Eq. 2).
    """
    base = None if base is None else jnp.asarray(base)
    tau, coeffs = jnp.asarray(tau), jnp.asarray(coeffs)
    groups = None if groups is None else jnp.asarray(groups)
    bases = None if base is None else [base]
    out = _apply(bases, [tau], [coeffs], [groups], implementation, block_sizes, "weighted_sum")
    return out[0]


def weighted_sum_leaves(
    bases: Sequence[jax.Array] | None,
    taus: Sequence[jax.Array],
    coeffs: Sequence[ArrayLike],
    groups: Sequence[jax.Array | None] | None = None,
    *,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> list[jax.Array]:
    """:func:`weighted_sum_leaf` for a list of leaves at once (a few kernels for all of them).

    Args:
      bases: θ0's leaves, or ``None`` (plain weighted sums).
      taus: per leaf, its stacked task vectors ``[T, *shape]`` (the same T for all).
      coeffs: per leaf, ``[T]`` (or ``[T, K]`` with group ids).
      groups: per leaf, integer group ids or ``None``.
      implementation: ``None`` | ``"xla"`` | ``"pallas"``.
      block_sizes: Pallas tile sizes (``leaves_per_call`` leaves share a kernel).

    Returns:
      The list of output leaves.

    Raises:
      ValueError: as :func:`weighted_sum_leaf`, naming the leaf's position.

    Example:
      >>> weighted_sum_leaves([w, b], [tau_w, tau_b], [lam_w, lam_b])
    """
    n = len(taus)
    groups = [None] * n if groups is None else list(groups)
    if len(groups) != n or len(coeffs) != n or (bases is not None and len(bases) != n):
        raise ValueError("weighted_sum_leaves: bases, taus, coeffs and groups differ in length")
    asarray = lambda xs: [None if x is None else jnp.asarray(x) for x in xs]  # noqa: E731
    return _apply(
        None if bases is None else asarray(bases),
        asarray(taus),
        asarray(coeffs),
        asarray(groups),
        implementation,
        block_sizes,
        "weighted_sum",
    )


def weighted_sum(
    base: ct.PyTree | None,
    task_vectors: Sequence[ct.PyTree] | ct.PyTree,
    coefficients: ArrayLike | ct.PyTree,
    *,
    groups: Sequence[jax.Array | None] | None = None,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> ct.PyTree:
    """θ0 + Σ_t c[t, b]·τ_t for every leaf b, in one pass per leaf.

    Args:
      base: θ0 (any pytree of arrays), or ``None`` for Σ_t c[t, b]·τ_t alone.
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees.
      coefficients: a scalar λ (task arithmetic: every task and leaf), one ``[T]`` array
        shared by every leaf, or a tree of θ0's structure with a ``[T]`` (or ``[T, K]`` with groups) array per
        leaf (aTLAS).
      groups: optional, per leaf in flattening order, integer group ids of the leaf's shape
        or ``None``; leaves with group ids need ``[T, K]`` coefficients.
      implementation: ``None`` | ``"xla"`` | ``"pallas"`` (see :func:`weighted_sum_leaf`).
      block_sizes: Pallas tile sizes.

    Returns:
      A tree of θ0's structure and dtypes (τ's without θ0). Differentiable: the cotangent of
      the coefficients is :func:`block_dots` of the output cotangent.

    Raises:
      ValueError: on mismatched trees (first differing path named) or bad arguments.

    Example:
      >>> theta = weighted_sum(theta0, [tau_a, tau_b], 0.3 * jnp.ones(2))  # task arithmetic

    References:
      Ilharco et al., ICLR 2023; Zhang et al., aTLAS, NeurIPS 2024.
    """
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    tv_leaves, treedef = jax.tree.flatten(tvs)
    base_leaves = None
    if base is not None:
        ct.check_same_structure(base, tvs, names=("base", "task_vectors"), b_leading=(t,))
        base_leaves = jax.tree.leaves(base)
    like = tvs if base is None else base
    if isinstance(coefficients, int | float) or getattr(coefficients, "ndim", None) == 0:
        coefficients = jnp.full((t,), coefficients, jnp.float32)  # one λ for every task
    if hasattr(coefficients, "shape") and hasattr(coefficients, "dtype"):
        c_leaves = [jnp.asarray(coefficients)] * len(tv_leaves)  # one [T] for every leaf
    else:
        ct.check_same_structure(
            like, coefficients, names=("base", "coefficients"), check_shapes=False
        )
        c_leaves = jax.tree.leaves(coefficients)
    grp = block_dots_api.per_leaf(groups, len(tv_leaves), "weighted_sum")
    out = weighted_sum_leaves(
        base_leaves,
        tv_leaves,
        c_leaves,
        grp,
        implementation=implementation,
        block_sizes=block_sizes,
    )
    return jax.tree.unflatten(treedef, out)
