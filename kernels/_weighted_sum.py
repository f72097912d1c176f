"""``weighted_sum``: θ0 + Σ_t c[t, b]·τ_t in one pass (task arithmetic, soups, aTLAS).

Per leaf b, the kernel reads a tile of θ0 and the T tiles of τ beside it, accumulates in
float32 (whatever the storage dtype: bfloat16/float16 task vectors are widened in registers)
and writes the tile once in θ0's dtype: ``(T + 1)`` reads and one write of the leaf, the
memory roofline. With aTLAS×K group ids, the coefficient of each entry is ``c[t, group]``,
selected in registers from the ``T·K`` scalars.

Gradients: ``jax.custom_vjp``. The cotangent of the coefficients is ``<dL/dθ_b, τ_t,b>``,
i.e. :func:`cljax.kernels.block_dots` through the same dispatcher; those of θ0 and of τ are
computed only when they are differentiated (``symbolic_zeros``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from cljax import tree as ct
from cljax.kernels import _block_dots, _dispatch
from cljax.kernels._dispatch import BlockSizes

__all__ = ["weighted_sum", "weighted_sum_leaf"]


def per_entry(c_row: jax.Array, groups: jax.Array | None) -> jax.Array:
    """The coefficient of every entry for one task: a scalar, or ``c_row[groups]``."""
    if groups is None:
        return c_row
    return jnp.take(c_row, groups.astype(jnp.int32), mode="clip")


def _accum(out_dtype, coeff_dtype) -> jnp.dtype:
    return jnp.promote_types(ct.accum_dtype(out_dtype), ct.accum_dtype(coeff_dtype))


def _kernel(*refs, num_tasks: int, num_groups: int | None, has_base: bool, acc):
    refs = list(refs)
    base_ref = refs.pop(0) if has_base else None
    tau_ref, c_ref = refs.pop(0), refs.pop(0)
    grp_ref = refs.pop(0) if num_groups is not None else None
    out_ref = refs[-1]  # an aliased poison input, if any, sits before it and is not read
    shape = out_ref.shape
    out = base_ref[...].astype(acc) if has_base else jnp.zeros(shape, acc)
    gid = None if grp_ref is None else grp_ref[...].astype(jnp.int32)
    for t in range(num_tasks):
        x = tau_ref[t].astype(acc)
        if gid is None:
            scale = c_ref[t].astype(acc)
        else:  # c[t, gid] by selects: T·K cheap VPU ops per entry, no gather
            k0 = t * num_groups
            scale = jnp.full(shape, c_ref[k0].astype(acc))
            for k in range(1, num_groups):
                scale = jnp.where(gid == k, c_ref[k0 + k].astype(acc), scale)
        out = out + scale * x
    out_ref[...] = out.astype(out_ref.dtype)


def _pallas_tiles(
    base: jax.Array | None,
    tau: jax.Array,
    coeffs: jax.Array,
    groups: jax.Array | None,
    num_groups: int | None,
    out_dtype,
    tl: _dispatch.Tiling,
    bs: BlockSizes,
    *,
    poison: jax.Array | None = None,
) -> jax.Array:
    """The kernel on tiled inputs ``[rows, lanes]``; ``poison`` (tests) is the aliased output."""
    from jax.experimental import pallas as pl

    num_tasks = tau.shape[0]
    acc = _accum(out_dtype, coeffs.dtype)
    n_c = num_tasks * (num_groups or 1)
    cvec = jnp.pad(coeffs.reshape(-1).astype(acc), (0, _dispatch.next_pow2(n_c) - n_c))
    tile = pl.BlockSpec((tl.block_rows, tl.lanes), lambda i: (i, 0))
    in_specs, args = [], []
    if base is not None:
        in_specs.append(tile)
        args.append(base)
    in_specs += [
        pl.BlockSpec((num_tasks, tl.block_rows, tl.lanes), lambda i: (0, i, 0)),
        _dispatch.scalar_spec(),
    ]
    args += [tau, cvec]
    if groups is not None:
        in_specs.append(tile)
        args.append(groups)
    aliases = {}
    if poison is not None:
        aliases = {len(args): 0}
        in_specs.append(tile)
        args.append(poison)
    kernel = functools.partial(
        _kernel,
        num_tasks=num_tasks,
        num_groups=num_groups,
        has_base=base is not None,
        acc=acc,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tl.rows, tl.lanes), out_dtype),
        grid=(tl.num_blocks,),
        in_specs=in_specs,
        out_specs=tile,
        input_output_aliases=aliases,
        interpret=_dispatch.interpret_mode(),
        compiler_params=_dispatch.compiler_params(bs),
        name="cljax_weighted_sum",
    )(*args)


def _pallas(base, tau, coeffs, groups, num_groups, out_dtype, bs):
    shape = tau.shape[1:]
    tl = _dispatch.tiling(tau[0].size, bs)
    y = _pallas_tiles(
        None if base is None else _dispatch.to_tiles(base, tl),
        _dispatch.to_tiles(tau, tl, stacked=True),
        coeffs,
        None if groups is None else _dispatch.to_tiles(groups, tl),
        num_groups,
        out_dtype,
        tl,
        bs,
    )
    return _dispatch.from_tiles(y, tl, shape)


def _xla(base, tau, coeffs, groups, out_dtype):
    """Reference: slice by slice, one fused pass (no ``[T, ...]`` float32 temporary)."""
    acc = _accum(out_dtype, coeffs.dtype)
    c = coeffs.astype(acc)
    out = jnp.zeros(tau.shape[1:], acc) if base is None else base.astype(acc)
    for t in range(tau.shape[0]):
        out = out + per_entry(c[t], groups) * tau[t].astype(acc)
    return out.astype(out_dtype)


def _forward(base, tau, coeffs, groups, num_groups, impl, bs, out_dtype=None):
    if out_dtype is None:
        out_dtype = tau.dtype if base is None else base.dtype
    if impl == "pallas":
        return _pallas(base, tau, coeffs, groups, num_groups, out_dtype, bs)
    return _xla(base, tau, coeffs, groups, out_dtype)


@functools.cache
def _op(impl: str, bs: BlockSizes, num_groups: int | None):
    """A custom-VJP ``(θ0 | None, τ, c, groups) -> θ`` for one leaf."""

    @jax.custom_vjp
    def op(base, tau, coeffs, groups):
        return _forward(base, tau, coeffs, groups, num_groups, impl, bs)

    def fwd(base, tau, coeffs, groups):
        b = None if base is None else base.value
        groups = None if groups is None else groups.value
        out = _forward(b, tau.value, coeffs.value, groups, num_groups, impl, bs)
        res = (
            tau.value,
            coeffs.value,
            groups,
            jnp.zeros((0,), b.dtype) if base is not None and base.perturbed else None,
            jnp.zeros((0,), tau.value.dtype) if tau.perturbed else None,
            coeffs.perturbed,
        )
        return out, res

    def bwd(res, g):
        tau, coeffs, groups, base_flag, tau_flag, c_perturbed = res
        if isinstance(g, SymbolicZero):
            g = jnp.zeros(tau.shape[1:], g.aval.dtype)
        dc = None
        if c_perturbed:  # dL/dc[t, k] = <g, τ_t> over the entries of group k: block_dots
            dc = _block_dots._forward(g, tau, groups, num_groups, impl, bs)
            dc = dc.astype(coeffs.dtype)
        dbase = None if base_flag is None else g.astype(base_flag.dtype)
        dtau = None
        if tau_flag is not None:  # exact, but T copies of the leaf: only when asked for
            acc = _accum(g.dtype, coeffs.dtype)
            c, ga = coeffs.astype(acc), g.astype(acc)
            dtau = jnp.stack([per_entry(c[t], groups) * ga for t in range(tau.shape[0])])
            dtau = dtau.astype(tau_flag.dtype)
        return dbase, dtau, dc, None

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


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
    num_groups = _check_leaf(base, tau, coeffs, groups, "weighted_sum")
    impl = _dispatch.resolve(implementation, where="weighted_sum")
    bs = _dispatch.block_sizes_or_default(block_sizes)
    return _op(impl, bs, num_groups)(base, tau, coeffs, groups)


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
    if base is not None:
        ct.check_same_structure(base, tvs, names=("base", "task_vectors"), b_leading=(t,))
        base_leaves = jax.tree.leaves(base)
    else:
        base_leaves = [None] * len(tv_leaves)
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
    grp = _block_dots._per_leaf(groups, len(tv_leaves), "weighted_sum")
    out = [
        weighted_sum_leaf(b, tau, c, gi, implementation=implementation, block_sizes=block_sizes)
        for b, tau, c, gi in zip(base_leaves, tv_leaves, c_leaves, grp, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
