"""aTLAS blocks: which parameter entries share one coefficient per task vector.

A *block* is a set of parameter entries that share one coefficient per task vector. By
default every floating-point leaf of the parameter tree is one block (the JAX counterpart
of the reference's one block per ``state_dict`` tensor). Path rules merge leaves into one
block (``groups``) or leave them out (``exclude``): :data:`CLIP_QKV_GROUPS` ties q, k and v
of each attention layer of a Hugging Face-layout CLIP as the reference's packed open_clip
tensors do. ``partitions=K`` splits each block's entries into K random groups (aTLAS×K),
one draw shared by every block of the same shape, as the reference.

References:
  Zhang, Fournier, Gould et al., "Knowledge Composition using Task Vectors with Learned
  Anisotropic Scaling", NeurIPS 2024 (arXiv:2407.02880).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from cljax import tree as ct

__all__ = ["CLIP_QKV_GROUPS", "VIT_QKV_GROUPS", "Blocks", "blocks", "partition_masks"]

Params = ct.Params
PartitionScope = Literal["2d", "2d_only", "all"]

#: ``groups`` for the Hugging Face CLIP layout of :mod:`cljax.models.clip` (paths such as
#: ``vision_model/encoder/layers_3/self_attn/q_proj/kernel``): per attention layer, the q, k
#: and v kernels form one block and the q, k and v biases another, as the reference's
#: open_clip encoder stores them (one packed ``in_proj_weight`` and one ``in_proj_bias``
#: tensor per layer, one coefficient each).
CLIP_QKV_GROUPS: tuple[tuple[str, str], ...] = (
    (r"^(.*/self_attn)/[qkv]_proj/kernel$", r"\1/qkv_kernel"),
    (r"^(.*/self_attn)/[qkv]_proj/bias$", r"\1/qkv_bias"),
)

#: The same ties for Flax linen's ``nn.MultiHeadDotProductAttention`` (``.../query/kernel``,
#: ``.../key/bias``, ...), the attention of :class:`cljax.models.ViT`.
VIT_QKV_GROUPS: tuple[tuple[str, str], ...] = (
    (r"^(.*)/(query|key|value)/kernel$", r"\1/qkv_kernel"),
    (r"^(.*)/(query|key|value)/bias$", r"\1/qkv_bias"),
)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The static block layout of a parameter tree (hashable: usable as a jit static arg).

    Attributes:
      paths: every leaf path of the parameter tree, in flattening order.
      shapes: the shape of every leaf.
      block_of: per leaf, the index of its block in ``names``, or -1 when the leaf is not
        composed (excluded, not floating point, or non-2-D under ``"2d_only"``).
      names: block names in order of first appearance (the coefficient tree's paths).
      partitioned: per block, whether its coefficient is ``[T, K]`` (else ``[T]``).
      partitions: K, or ``None`` without partitioning.
      seed: seed of the partition masks.
    """

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    block_of: tuple[int, ...]
    names: tuple[str, ...]
    partitioned: tuple[bool, ...]
    partitions: int | None
    seed: int

    @property
    def num_blocks(self) -> int:
        return len(self.names)

    def members(self, name: str) -> list[str]:
        """The leaf paths of block ``name``."""
        i = self.names.index(name)
        return [p for p, b in zip(self.paths, self.block_of, strict=True) if b == i]

    def coefficient_shape(self, name: str, num_tasks: int) -> tuple[int, ...]:
        i, k = self.names.index(name), self.partitions
        return (num_tasks, k) if self.partitioned[i] and k is not None else (num_tasks,)

    def num_coefficients(self, num_tasks: int) -> int:
        """The number of trainable numbers for T task vectors."""
        return sum(math.prod(self.coefficient_shape(n, num_tasks)) for n in self.names)

    def describe(self) -> str:
        """A listing of the blocks and their member leaves (what the rules selected)."""
        lines = [
            f"{self.num_blocks} blocks"
            + (f", partitions K={self.partitions} (seed {self.seed})" if self.partitions else "")
        ]
        for i, n in enumerate(self.names):
            mem = self.members(n)
            tag = " [T, K]" if self.partitioned[i] else " [T]"
            if len(mem) == 1 and mem[0] == n:
                lines.append(f"  {n}{tag}")
            else:
                lines.append(f"  {n}{tag}: " + ", ".join(mem))
        off = [p for p, b in zip(self.paths, self.block_of, strict=True) if b < 0]
        if off:
            lines.append(f"not composed ({len(off)}): " + ", ".join(off))
        return "\n".join(lines)


def blocks(
    params: Params,
    *,
    groups: Sequence[tuple[str, str]] = (),
    exclude: Sequence[str] = (),
    partitions: int | None = None,
    partition_scope: PartitionScope = "2d",
    seed: int = 0,
) -> Blocks:
    """Builds the block layout of aTLAS for a parameter tree.

    Every floating-point leaf is its own block unless a rule says otherwise:

    * ``exclude``: regexes (``re.search`` on the ``/``-joined path); a matching leaf is not
      composed (it keeps θ0 and has no coefficient). Exclusion wins over grouping.
    * ``groups``: ``(regex, name)`` pairs; a matching leaf joins the block called
      ``match.expand(name)``, so backreferences make one group per layer.
      :data:`CLIP_QKV_GROUPS` (Hugging Face CLIP, :mod:`cljax.models.clip`) and
      :data:`VIT_QKV_GROUPS` (linen attention, :class:`cljax.models.ViT`) tie the q, k and
      v kernels of each layer into one block and their biases into another, as open_clip's
      packed ``in_proj_weight`` and ``in_proj_bias`` are one block each in the reference.
      Unlike most cljax rules, groups are *not* first-match: a leaf matched by two groups
      is an error, since a silent choice would change which leaves share a coefficient.

    A ``groups`` rule that selects no floating-point leaf is an error (a rule written for
    another layout would silently leave the blocks per leaf); an ``exclude`` rule that
    selects none draws a warning.

    With ``partitions=K`` (aTLAS×K) the entries of each partitioned block are assigned to K
    groups by a fixed random draw from ``seed``, drawn once per block shape and shared by
    every block of that shape, as the reference (see :func:`partition_masks`); one
    coefficient per (task vector, block, group). ``partition_scope`` says which blocks are
    partitioned. The reference partitions the 2-D tensors of open_clip (linear weights, the
    packed q/k/v projection, the position embedding); their Flax counterparts are the
    *matrix-like* leaves: at most 3 axes, at least 2 of size > 1 (``Dense`` kernels,
    ``DenseGeneral`` attention kernels ``[d, heads, head_dim]``, a ``[1, L, d]`` position
    embedding), not biases, LayerNorm, a ``[1, 1, d]`` class token or 4-D conv kernels.
    A block is partitioned when all its leaves are matrix-like.

    * ``"2d"`` (default): matrix-like blocks get ``[T, K]`` coefficients and the others
      keep one coefficient per task vector (``[T]``). This deviates from the reference.
    * ``"2d_only"``: the reference's behaviour, where the helper returns a zero
      contribution for every non-2-D tensor, so those leaves are not composed at all.
    * ``"all"``: every block is partitioned.

    Args:
      params: the pretrained parameters (a pytree of arrays; only shapes are read).
      groups: ``(regex, name_template)`` pairs tying leaves into one block.
      exclude: regexes of leaves left out of the composition.
      partitions: K >= 1, or ``None`` for no partitioning.
      partition_scope: ``"2d"``, ``"2d_only"`` or ``"all"`` (see above).
      seed: seed of the partition masks.

    Returns:
      A hashable :class:`Blocks`.

    Raises:
      ValueError: on K < 1 or K above the entries of the largest partitioned block, an
        unknown scope, a malformed rule, a ``groups`` rule that
        matches no leaf (naming the rule and example paths), a leaf claimed by two groups,
        or a block name that collides with another block's name or nests under it.

    Example:
      >>> spec = blocks(clip_params, groups=CLIP_QKV_GROUPS)
      >>> print(spec.describe())

    References:
      aTLAS (NeurIPS 2024), §3 and ``src/composition.py`` of the reference implementation.
    """
    if partitions is not None:
        if isinstance(partitions, bool) or not isinstance(partitions, int | np.integer):
            raise ValueError(f"{partitions=} must be an int >= 1 or None")
        if partitions < 1:
            raise ValueError(f"{partitions=} must be >= 1")
        partitions = int(partitions)  # bounded by the block sizes below
    if partition_scope not in ("2d", "2d_only", "all"):
        raise ValueError(f"{partition_scope=} must be '2d', '2d_only' or 'all'")
    if isinstance(exclude, str):
        exclude = (exclude,)
    ex = []
    for i, rx in enumerate(exclude):
        if not isinstance(rx, str):
            raise ValueError(f"exclude[{i}]={rx!r} must be a regex string")
        ex.append(_compile(rx, f"exclude[{i}]"))
    gr = []
    for i, rule in enumerate(groups):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[1], str)):
            raise ValueError(f"groups[{i}]={rule!r} must be a (regex, name) pair of strings")
        gr.append((_compile(rule[0], f"groups[{i}]"), rule[1]))

    leaves = ct.leaves_with_paths(params)
    if not leaves:
        raise ValueError("params has no leaves")
    ct.check_leaves(params, name="params")
    ex_hits = [0] * len(ex)
    gr_hits = [0] * len(gr)
    names: dict[str, int] = {}
    member_ndims: list[list[tuple[int, ...]]] = []
    block_of = []
    for path, x in leaves:
        if not ct.is_float(x):
            block_of.append(-1)
            continue
        hit = [j for j, rx in enumerate(ex) if rx.search(path)]
        for j in hit:
            ex_hits[j] += 1
        matches = [(j, m) for j, (rx, _) in enumerate(gr) if (m := rx.search(path))]
        for j, _ in matches:
            gr_hits[j] += 1
        if hit:
            block_of.append(-1)
            continue
        if len(matches) > 1:
            (i, _), (j, _) = matches[:2]
            raise ValueError(
                f"leaf {path!r} is claimed by two groups: groups[{i}]={groups[i][0]!r} and "
                f"groups[{j}]={groups[j][0]!r}; make the regexes disjoint"
            )
        name = matches[0][1].expand(gr[matches[0][0]][1]) if matches else path
        if not name or any(not part for part in name.split("/")):
            raise ValueError(f"leaf {path!r} maps to an invalid block name {name!r}")
        if name not in names:
            names[name] = len(names)
            member_ndims.append([])
        member_ndims[names[name]].append(tuple(np.shape(x)))
        block_of.append(names[name])

    no_group = [f"groups[{j}]={groups[j][0]!r}" for j, n in enumerate(gr_hits) if n == 0]
    if no_group:
        floats = [p for p, x in leaves if ct.is_float(x)]
        examples = ", ".join(repr(p) for p in floats[:4]) + (", ..." if len(floats) > 4 else "")
        raise ValueError(
            f"aTLAS groups rule(s) that match no floating-point leaf: {', '.join(no_group)}; "
            f"leaf paths look like {examples} (for cljax.models.clip use "
            "atlas.CLIP_QKV_GROUPS)"
        )
    unused = [f"exclude[{j}]={exclude[j]!r}" for j, n in enumerate(ex_hits) if n == 0]
    if unused:
        warnings.warn(
            "aTLAS block rules that match no leaf: " + ", ".join(unused), UserWarning, stacklevel=2
        )
    _check_names(list(names))

    name_list = list(names)
    partitioned = []
    dropped = set()
    for b, nd in enumerate(member_ndims):
        if partitions is None:
            partitioned.append(False)
        elif partition_scope == "all" or all(_matrix_like(d) for d in nd):
            partitioned.append(True)
        else:
            partitioned.append(False)
            if partition_scope == "2d_only":
                dropped.add(b)
    if dropped:  # the reference's behaviour: non-2-D blocks get no contribution
        keep = [b for b in range(len(name_list)) if b not in dropped]
        remap = {old: new for new, old in enumerate(keep)}
        block_of = [remap.get(b, -1) if b >= 0 else -1 for b in block_of]
        name_list = [name_list[b] for b in keep]
        partitioned = [partitioned[b] for b in keep]
    if not name_list:
        raise ValueError("no leaf is composed: every leaf is excluded or not floating point")
    if partitions is not None and any(partitioned):
        # A block with fewer entries than K leaves groups empty; beyond the largest block
        # every further group is empty everywhere and only costs coefficients (T x K each).
        sizes = [0] * len(name_list)
        for (_, x), b in zip(leaves, block_of, strict=True):
            if b >= 0:
                sizes[b] += int(np.prod(np.shape(x), dtype=np.int64))
        largest = max(s for s, p in zip(sizes, partitioned, strict=True) if p)
        if partitions > largest:
            raise ValueError(
                f"{partitions=} exceeds the {largest} entries of the largest partitioned "
                "block; every group beyond that is empty"
            )
    return Blocks(
        paths=tuple(p for p, _ in leaves),
        shapes=tuple(tuple(np.shape(x)) for _, x in leaves),
        block_of=tuple(block_of),
        names=tuple(name_list),
        partitioned=tuple(partitioned),
        partitions=partitions,
        seed=int(seed),
    )


def _matrix_like(shape: tuple[int, ...]) -> bool:
    """The JAX counterpart of the reference's 2-D tensors (see :func:`blocks`)."""
    return len(shape) <= 3 and sum(s > 1 for s in shape) >= 2


def _compile(rx: str, where: str) -> re.Pattern:
    try:
        return re.compile(rx)
    except re.error as e:
        raise ValueError(f"{where} has an invalid regex {rx!r}: {e}") from None


def _check_names(names: list[str]) -> None:
    s = set(names)
    for n in names:
        parts = n.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in s:
                raise ValueError(
                    f"block name {n!r} nests under block {prefix!r}: coefficient trees are "
                    "nested dicts, rename the group"
                )


def partition_masks(params: Params, spec: Blocks) -> list[np.ndarray | None]:
    """The fixed random group assignment of every leaf's entries (aTLAS×K).

    As the reference, the assignment is drawn once per tensor *shape*: every block of the
    same shape shares one draw (the reference keys its masks by ``p.shape``, so same-shaped
    tensors in different layers use the same mask). A block's shape is the tuple of its
    member leaves' shapes: a block of q, k and v kernels, ``((d, d),) * 3``, is the
    counterpart of open_clip's packed ``(3d, d)`` tensor, its members get independent
    entries of one draw, and it shares that draw with the q/k/v blocks of the other layers
    but not with a single ``(d, d)`` leaf. The draw of a shape is
    ``default_rng([seed, <the shape's integers>])``, member by member, so it does not depend
    on which other leaves the tree holds. Each entry is in exactly one of the K groups.

    Args:
      params: the parameter tree the layout was built from (only shapes are read).
      spec: a :class:`Blocks` with ``partitions`` set.

    Returns:
      A list with one entry per leaf (flattening order): an ``int8``/``int32`` numpy array
      of the leaf's shape for leaves of partitioned blocks (leaves of blocks of the same
      shape hold the same array), ``None`` otherwise. Pass it to :func:`compose` as
      ``masks`` (it is data, not a constant of the compiled function).

    Raises:
      ValueError: if ``spec`` does not describe ``params``.
    """
    _check_spec(params, spec)
    dtype = np.int8 if (spec.partitions or 1) <= 127 else np.int32
    members: dict[int, list[int]] = {}
    for i, b in enumerate(spec.block_of):
        if b >= 0 and spec.partitioned[b]:
            members.setdefault(b, []).append(i)
    out: list[np.ndarray | None] = [None] * len(spec.paths)
    drawn: dict[tuple[tuple[int, ...], ...], list[np.ndarray]] = {}
    for idx in members.values():
        shape = tuple(spec.shapes[i] for i in idx)
        if shape not in drawn:
            rng = np.random.default_rng([spec.seed, *_shape_words(shape)])
            drawn[shape] = [rng.integers(0, spec.partitions, size=s, dtype=dtype) for s in shape]
        for i, m in zip(idx, drawn[shape], strict=True):
            out[i] = m
    return out


def _shape_words(shape: tuple[tuple[int, ...], ...]) -> list[int]:
    """A block's shape as seed words, unambiguous: the member count, then per member its
    rank and sizes."""
    words = [len(shape)]
    for s in shape:
        words += [len(s), *s]
    return words


def _check_spec(params: Params, spec: Blocks) -> list[tuple[str, Any]]:
    if not isinstance(spec, Blocks):
        raise ValueError(f"blocks must be a cljax.merging.atlas.Blocks, got {type(spec).__name__}")
    leaves = ct.leaves_with_paths(params)
    got = tuple(p for p, _ in leaves)
    if got != spec.paths:
        diff = next(
            (f"{a!r} vs {b!r}" for a, b in zip(got, spec.paths, strict=False) if a != b),
            f"{len(got)} vs {len(spec.paths)} leaves",
        )
        raise ValueError(f"blocks were built for another parameter tree: first difference {diff}")
    for (p, x), s in zip(leaves, spec.shapes, strict=True):
        if tuple(np.shape(x)) != s:
            raise ValueError(f"blocks were built for shape {s} at {p!r}, params has {np.shape(x)}")
    return leaves
