"""Shared machinery of the kernels: block sizes, dispatch, and the 2-D tiling of leaves.

Every kernel works on one leaf at a time. A leaf of ``n`` entries is viewed as a 2-D array of
``rows × lanes`` (``lanes`` = 128, the TPU lane width and a power of two for Triton), and the
grid walks over blocks of ``block_rows`` rows. A stacked leaf ``[T, *shape]`` becomes
``[T, rows, lanes]`` and each grid step sees all T slices of one block, so a kernel reads each
byte once and keeps the T-fold work (sums, dot products, votes) in registers or VMEM.

The reshape is free when ``n`` is a multiple of ``block_rows · lanes``; otherwise the leaf is
zero-padded up to the next multiple (a copy, which only small leaves pay: ``block_rows`` is
chosen as the largest power of two, down to ``min_rows``, that divides the number of rows).
Zero padding is neutral for every op here (it adds nothing to a sum or a dot product, and a
zero neither passes a TIES trim of a positive threshold nor votes), so kernels never mask; the
padded tail of an output is sliced away. Every grid step is a full block: no kernel depends on
how a backend treats out-of-bounds blocks (Triton does not mask them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "BlockSizes",
    "Tiling",
    "compiler_params",
    "from_tiles",
    "interpret_mode",
    "next_pow2",
    "resolve",
    "scalar_spec",
    "tiling",
    "to_tiles",
]

_IMPLEMENTATIONS = (None, "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels (hashable: they are static arguments of compiled code).

    Attributes:
      rows: rows per grid step (a power of two). A step touches ``T · rows · lanes`` entries
        of the task vectors; the default per platform keeps that within VMEM on TPU and
        within a few registers per thread on GPU. In interpret mode on the CPU each step
        costs milliseconds, so use large blocks there.
      lanes: entries per row (a multiple of 128).
      min_rows: the smallest block height tried before padding a leaf whose row count has
        no larger power-of-two divisor (32 keeps int8 group ids TPU-tileable).
      num_warps: Triton warps per program (GPU only; ``None``: the compiler's default).

    Example:
      >>> BlockSizes(rows=512)
      BlockSizes(rows=512, lanes=128, min_rows=32, num_warps=None)
    """

    rows: int = 256
    lanes: int = 128
    min_rows: int = 32
    num_warps: int | None = None

    def __post_init__(self):
        for name in ("rows", "min_rows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"BlockSizes.{name}={v!r} must be a positive power of two")
        if not isinstance(self.lanes, int) or self.lanes < 128 or self.lanes % 128:
            raise ValueError(f"BlockSizes.lanes={self.lanes!r} must be a multiple of 128")
        if self.min_rows > self.rows:
            raise ValueError(f"BlockSizes.min_rows={self.min_rows} must be <= rows={self.rows}")
        if self.num_warps is not None and (
            self.num_warps < 1 or self.num_warps & (self.num_warps - 1)
        ):
            raise ValueError(f"BlockSizes.num_warps={self.num_warps!r} must be a power of two")

    @classmethod
    def default(cls, platform: str) -> BlockSizes:
        """Defaults per platform: ``"gpu"``, ``"tpu"`` or ``"cpu"`` (interpret mode)."""
        if platform == "gpu":
            return cls(rows=32, num_warps=4)
        if platform == "tpu":
            return cls(rows=256)
        return cls(rows=512)  # interpret mode: few, large steps


def resolve(implementation: str | None, *, where: str) -> str:
    """The implementation an op runs: ``None`` -> ``"pallas"`` on GPU/TPU, ``"xla"`` on the CPU.

    Args:
      implementation: ``None``, ``"xla"`` or ``"pallas"`` (``"pallas"`` on the CPU runs
        the kernels in interpret mode: slow, for tests).
      where: the calling function, named in the error.

    Returns:
      ``"xla"`` or ``"pallas"``.

    Raises:
      ValueError: for any other value.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"{implementation=} must be one of None, 'xla', 'pallas' (in {where})")
    if implementation is None:
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    return implementation


def interpret_mode() -> bool:
    """Pallas runs in interpret mode where there is no GPU/TPU lowering (the CPU)."""
    return jax.default_backend() not in ("gpu", "tpu")


def platform() -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"``."""
    b = jax.default_backend()
    return b if b in ("gpu", "tpu") else "cpu"


def block_sizes_or_default(block_sizes: BlockSizes | None) -> BlockSizes:
    if block_sizes is None:
        return BlockSizes.default(platform())
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes must be a cljax.kernels.BlockSizes, got {block_sizes!r}")
    return block_sizes


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class Tiling(NamedTuple):
    """How one leaf of ``size`` entries is laid out as ``[rows, lanes]`` tiles."""

    size: int
    rows: int  # padded row count, a multiple of block_rows
    block_rows: int
    lanes: int

    @property
    def num_blocks(self) -> int:
        return self.rows // self.block_rows

    @property
    def padded(self) -> bool:
        return self.rows * self.lanes != self.size


def tiling(size: int, bs: BlockSizes) -> Tiling:
    """The tiling of a leaf of ``size`` entries (see the module docstring)."""
    rows = -(-size // bs.lanes)
    if rows <= bs.rows:  # one block; pad its height to a power of two >= min_rows
        br = max(bs.min_rows, next_pow2(rows))
        return Tiling(size, br, br, bs.lanes)
    br = bs.rows
    while br > bs.min_rows and rows % br:
        br //= 2
    return Tiling(size, -(-rows // br) * br, br, bs.lanes)


def to_tiles(x: jax.Array, tl: Tiling, *, stacked: bool = False) -> jax.Array:
    """``[*shape] -> [rows, lanes]`` (or ``[T, *shape] -> [T, rows, lanes]``), zero-padded."""
    lead = (x.shape[0],) if stacked else ()
    flat = x.reshape(*lead, tl.size)
    pad = tl.rows * tl.lanes - tl.size
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)])
    return flat.reshape(*lead, tl.rows, tl.lanes)


def from_tiles(y: jax.Array, tl: Tiling, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`to_tiles` for an unstacked leaf."""
    flat = y.reshape(-1)
    if tl.padded:
        flat = flat[: tl.size]
    return flat.reshape(shape)


def scalar_spec() -> Any:
    """A BlockSpec for a small vector of scalars read whole by every grid step."""
    from jax.experimental import pallas as pl

    if platform() == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(memory_space=None)


def compiler_params(bs: BlockSizes) -> Any:
    """Backend compiler parameters: Triton on GPU, Mosaic (parallel grid) on TPU."""
    p = platform()
    if p == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=bs.num_warps)
    if p == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",))
    return None


def pad_vector(v: jax.Array, length: int) -> jax.Array:
    """A 1-D float32 vector zero-padded to ``length`` (a power of two, for Triton loads)."""
    v = v.reshape(-1).astype(jnp.float32)
    return jnp.pad(v, (0, length - v.shape[0]))
