"""The weighted sum in XLA: the reference, and the library's path on the CPU.

:func:`leaf` computes one leaf of θ0 + Σ_t c[t]·τ_t slice by slice in one fused pass;
:func:`packed` handles many small leaves at once, concatenated (the Pallas backend sends
leaves below ``BlockSizes.xla_below`` entries there instead of launching a kernel for each).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax.kernels import _dispatch

__all__ = ["accum_dtype", "leaf", "packed", "per_entry"]


def per_entry(c_row: jax.Array, groups: jax.Array | None) -> jax.Array:
    """The coefficient of every entry for one task: a scalar, or ``c_row[groups]``."""
    if groups is None:
        return c_row
    return jnp.take(c_row, groups.astype(jnp.int32), mode="clip")


def accum_dtype(out_dtype, coeff_dtype) -> jnp.dtype:
    """The accumulation dtype: float32 at least, float64 for float64 outputs or coefficients."""
    return jnp.promote_types(ct.accum_dtype(out_dtype), ct.accum_dtype(coeff_dtype))


def _entry_coeffs(c: jax.Array, groups: jax.Array | None, n: int, num_tasks: int, acc):
    """``[T, n]``: the coefficient of every entry of a leaf, for every task."""
    c = c.astype(acc)
    if groups is None:
        return jnp.broadcast_to(c[:, None], (num_tasks, n))
    return jnp.take(c, groups.reshape(-1).astype(jnp.int32), axis=1, mode="clip")


def packed(bases, taus, coeffs, groups, out_dtypes):
    """Small leaves concatenated: one fused XLA pass instead of a kernel launch per leaf."""
    num_tasks = taus[0].shape[0]
    acc = functools.reduce(
        jnp.promote_types,
        [accum_dtype(o, c.dtype) for o, c in zip(out_dtypes, coeffs, strict=True)],
    )
    tau = _dispatch.pack(taus, acc, stacked=True)
    c = jnp.concatenate(
        [
            _entry_coeffs(ci, gi, math.prod(t.shape[1:]), num_tasks, acc)
            for ci, gi, t in zip(coeffs, groups, taus, strict=True)
        ],
        axis=1,
    )
    out = jnp.zeros(tau.shape[1:], acc) if bases is None else _dispatch.pack(bases, acc)
    for t in range(num_tasks):
        out = out + c[t] * tau[t]
    ys = _dispatch.unpack(out, [t.shape[1:] for t in taus])
    return [y.astype(o) for y, o in zip(ys, out_dtypes, strict=True)]


def leaf(base, tau, coeffs, groups, out_dtype):
    """One leaf, slice by slice, in one fused pass (no ``[T, ...]`` float32 temporary).

    With half-precision τ the result is written once, behind an optimisation barrier: it
    stops XLA from fusing the cast-and-accumulate over the T slices into the leaf's
    consumers, where XLA:CPU can evaluate it more than once (a model's layers read a
    composed weight several times). A float32 τ has no cast to repeat, and there the barrier
    would only cost fusions, so it goes without one.
    """
    acc = accum_dtype(out_dtype, coeffs.dtype)
    c = coeffs.astype(acc)
    out = jnp.zeros(tau.shape[1:], acc) if base is None else base.astype(acc)
    for t in range(tau.shape[0]):
        out = out + per_entry(c[t], groups) * tau[t].astype(acc)
    out = out.astype(out_dtype)
    if jnp.dtype(tau.dtype).itemsize < jnp.dtype(acc).itemsize:
        out = jax.lax.optimization_barrier(out)
    return out
