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

Many leaves share one kernel (:func:`multi_call`): the grid is the concatenation of their
block ranges and each program branches to its own leaf's operands, so a model of hundreds of
leaves costs a few launches and compilations. Leaves smaller than ``BlockSizes.xla_below``
are concatenated (:func:`pack`) and handled by one fused XLA computation instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "BlockSizes",
    "Tiling",
    "compiler_params",
    "from_tiles",
    "interpret_mode",
    "multi_call",
    "next_pow2",
    "pack",
    "resolve",
    "scalar_spec",
    "split_leaves",
    "tiling",
    "to_tiles",
    "unpack",
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
      leaves_per_call: how many leaves one ``pallas_call`` serves (:func:`multi_call`): the
        grid runs over the blocks of all of them and each program branches to its leaf, so
        a model of hundreds of leaves costs a few kernel launches and compilations instead
        of hundreds. 1 on TPU, where every input's block would be fetched at every step.
      xla_below: leaves with fewer entries skip the kernel: they are concatenated and
        handled by one fused XLA computation (launching a kernel per bias or LayerNorm
        scale costs more than moving its bytes).

    Example:
      >>> BlockSizes(rows=512)
      BlockSizes(rows=512, lanes=128, min_rows=32, num_warps=None, leaves_per_call=32, xla_below=0)
    """

    rows: int = 256
    lanes: int = 128
    min_rows: int = 32
    num_warps: int | None = None
    leaves_per_call: int = 32
    xla_below: int = 0

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
        if not isinstance(self.leaves_per_call, int) or self.leaves_per_call < 1:
            raise ValueError(
                f"BlockSizes.leaves_per_call={self.leaves_per_call!r} must be a positive int"
            )
        if not isinstance(self.xla_below, int) or self.xla_below < 0:
            raise ValueError(f"BlockSizes.xla_below={self.xla_below!r} must be an int >= 0")

    @classmethod
    def default(cls, platform: str) -> BlockSizes:
        """Defaults per platform: ``"gpu"``, ``"tpu"`` or ``"cpu"`` (interpret mode)."""
        if platform == "gpu":
            return cls(rows=32, num_warps=4, xla_below=1 << 14)
        if platform == "tpu":
            return cls(rows=256, leaves_per_call=1)
        return cls(rows=512, leaves_per_call=4)  # interpret mode: few, large steps


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


# ----------------------------------------------------------------------------- many leaves


def split_leaves(sizes: Sequence[int], bs: BlockSizes) -> tuple[list[int], list[list[int]]]:
    """Leaf indices for the packed XLA path, and the chunks of the others, one call each."""
    small = [j for j, n in enumerate(sizes) if n < bs.xla_below]
    big = [j for j, n in enumerate(sizes) if n >= bs.xla_below]
    k = bs.leaves_per_call
    return small, [big[i : i + k] for i in range(0, len(big), k)]


def pack(xs: Sequence[jax.Array], dtype, *, stacked: bool = False) -> jax.Array:
    """Leaves flattened and concatenated (``[T, Σn]`` when stacked), cast to ``dtype``."""
    if stacked:
        return jnp.concatenate([x.reshape(x.shape[0], -1).astype(dtype) for x in xs], axis=1)
    return jnp.concatenate([x.reshape(-1).astype(dtype) for x in xs])


def unpack(y: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
    """Inverse of :func:`pack` for unstacked leaves."""
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(y[at : at + n].reshape(s))
        at += n
    return out


def multi_call(
    leaf_kernel: Callable[..., None],
    tilings: Sequence[Tiling],
    leaf_inputs: Sequence[Sequence[jax.Array]],
    shared: Sequence[jax.Array],
    bs: BlockSizes,
    *,
    leaf_outputs: Sequence[Sequence[Any]] = (),
    partial_width: int | None = None,
    poison: Sequence[Sequence[jax.Array]] | None = None,
    name: str,
) -> tuple[list[list[jax.Array]], jax.Array | None]:
    """One ``pallas_call`` over the blocks of several tiled leaves.

    The grid is the concatenation of the leaves' block ranges; program ``i`` runs
    ``leaf_kernel(j, in_refs, shared_refs, out_refs, partial_ref)`` for the leaf ``j`` whose
    range holds ``i`` (under ``pl.when``; no branch for a single leaf). Each leaf's inputs are
    its own operands, blocked ``(block_rows, lanes)`` (2-D) or ``(T, block_rows, lanes)``
    (stacked), with index maps clamped to the leaf's range (a program of another leaf reads
    nothing of them). ``shared`` vectors are read whole by every program.

    Args:
      leaf_kernel: the body for one leaf (see above).
      tilings: per leaf, its :class:`Tiling`.
      leaf_inputs: per leaf, its tiled operands.
      shared: small 1-D operands (power-of-two lengths, for Triton).
      bs: block sizes (compiler parameters).
      leaf_outputs: per leaf, ``(dtype, ...)`` of its tiled outputs ``[rows, lanes]``.
      partial_width: if given, one ``[num_programs, 1, width]`` float32 output whose row
        ``i`` program ``i`` writes (per-block partial sums).
      poison: per leaf, arrays aliased to its outputs (tests: unwritten entries show).
      name: the kernel's name.

    Returns:
      Per leaf, its tiled outputs; and the partial sums (or ``None``).
    """
    from jax.experimental import pallas as pl

    num_leaves = len(tilings)
    starts, total = [], 0
    for tl in tilings:
        starts.append(total)
        total += tl.num_blocks

    def index(j):
        s, n = starts[j], tilings[j].num_blocks
        if num_leaves == 1:
            return lambda i: i
        return lambda i: jnp.minimum(jnp.maximum(i - s, 0), n - 1)

    def spec(x, j):
        tl, at = tilings[j], index(j)
        if x.ndim == 3:
            return pl.BlockSpec((x.shape[0], tl.block_rows, tl.lanes), lambda i: (0, at(i), 0))
        return pl.BlockSpec((tl.block_rows, tl.lanes), lambda i: (at(i), 0))

    args, in_specs, n_in = [], [], []
    for j, xs in enumerate(leaf_inputs):
        n_in.append(len(xs))
        for x in xs:
            args.append(x)
            in_specs.append(spec(x, j))
    for v in shared:
        args.append(v)
        in_specs.append(scalar_spec())
    out_shapes, out_specs, n_out = [], [], []
    for j, dtypes in enumerate(leaf_outputs):
        n_out.append(len(dtypes))
        tl = tilings[j]
        for dt in dtypes:
            out_shapes.append(jax.ShapeDtypeStruct((tl.rows, tl.lanes), dt))
            out_specs.append(spec(out_shapes[-1], j))
    if partial_width is not None:
        out_shapes.append(jax.ShapeDtypeStruct((total, 1, partial_width), jnp.float32))
        out_specs.append(pl.BlockSpec((None, 1, partial_width), lambda i: (i, 0, 0)))
    aliases = {}
    if poison is not None:  # leaf j's poison arrays alias its outputs, in order
        for j, ps in enumerate(poison):
            first = sum(n_out[:j])
            for k, p in enumerate(ps):
                aliases[len(args)] = first + k
                args.append(p)
                in_specs.append(spec(p, j))
    n_poison = len(aliases)
    n_shared = len(shared)

    def kernel(*refs):
        refs = list(refs)
        ins, at = [], 0
        for n in n_in:
            ins.append(refs[at : at + n])
            at += n
        sh = refs[at : at + n_shared]
        at += n_shared + n_poison
        outs = []
        for n in n_out:
            outs.append(refs[at : at + n])
            at += n
        part = refs[at] if partial_width is not None else None
        if num_leaves == 1:
            leaf_kernel(0, ins[0], sh, outs[0] if outs else [], part)
            return
        i = pl.program_id(0)
        for j in range(num_leaves):
            run = functools.partial(leaf_kernel, j, ins[j], sh, outs[j] if outs else [], part)
            pl.when((i >= starts[j]) & (i < starts[j] + tilings[j].num_blocks))(run)

    res = pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=(total,),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        interpret=interpret_mode(),
        compiler_params=compiler_params(bs),
        name=name,
    )(*args)
    res = list(res)
    per_leaf, at = [], 0
    for n in n_out:
        per_leaf.append(res[at : at + n])
        at += n
    return per_leaf, (res[at] if partial_width is not None else None)
