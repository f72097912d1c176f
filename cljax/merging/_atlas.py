"""aTLAS: task vectors composed with learned anisotropic (block-wise) coefficients.

A *block* is a set of parameter entries that share one coefficient per task vector. By
default every floating-point leaf of the parameter tree is one block (the JAX counterpart
of the reference's one block per ``state_dict`` tensor). Path rules merge leaves into one
block (``groups``) or leave them out (``exclude``): :data:`CLIP_QKV_GROUPS` ties q, k and v
of each attention layer of a Hugging Face-layout CLIP as the reference's packed open_clip
tensors do. ``partitions=K`` splits each block's entries into K random groups (aTLAS×K),
one draw shared by every block of the same shape, as the reference. The composed
parameters are

    θ_b = θ0_b + Σ_t Λ[t, b] · τ_{t, b}

and the gradient of a loss with respect to Λ is, by the chain rule,
``dL/dΛ[t, b] = <dL/dθ_b, τ_{t, b}>``: :func:`compose` carries a ``jax.custom_vjp`` that
computes these T·B dot products from the one cotangent ``dL/dθ``, so a training step costs
one forward and one backward pass of the model plus two passes over the stored task
vectors, whatever T is.

Coefficients are a nested dict keyed by the ``/``-split block names. With the default
blocks the names are the parameter paths, so for dict parameters (Flax linen) the
coefficient tree has exactly the parameters' structure, each leaf of shape ``[T]``
(``[T, K]`` for partitioned blocks).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import kernels
from cljax import tree as ct
from cljax.checkpoint import CheckpointCorruptError, CheckpointManager
from cljax.losses._entropy import entropy_loss, pseudo_label_loss
from cljax.train import TrainState, apply_step, make_step, raise_on_nonfinite

__all__ = [
    "CLIP_QKV_GROUPS",
    "VIT_QKV_GROUPS",
    "Blocks",
    "FitResult",
    "blocks",
    "compose",
    "default_optimizer",
    "entropy_objective",
    "few_shot_optimizer",
    "fit",
    "init",
    "negation_score",
    "partition_masks",
    "pseudo_label_objective",
    "supervised_objective",
    "task_addition_objective",
    "task_negation_objective",
]

Params = ct.Params
PyTree = ct.PyTree
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

_REF = (
    "Zhang, Fournier, Gould et al., 'Knowledge Composition using Task Vectors with Learned "
    "Anisotropic Scaling' (aTLAS), NeurIPS 2024, arXiv:2407.02880."
)


# ----------------------------------------------------------------------------- blocks


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


# ----------------------------------------------------------------------------- coefficients


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        *head, last = name.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def _flat_coefficients(coefficients: PyTree) -> dict[str, Any]:
    return dict(ct.leaves_with_paths(coefficients))


def init(
    pretrained: Params,
    task_vectors: Sequence[Params] | Params,
    spec: Blocks | None = None,
    *,
    dtype: Any = jnp.float32,
) -> dict:
    """Zero coefficients: composition starts exactly at the pretrained model.

    Args:
      pretrained: θ0.
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees.
      spec: the block layout (default: one block per floating-point leaf).
      dtype: coefficient dtype.

    Returns:
      A nested dict keyed by the ``/``-split block names, each leaf ``zeros([T])`` or
      ``zeros([T, K])``. With default blocks on dict parameters it has the parameters'
      structure.

    Raises:
      ValueError: if the task vectors do not match the parameters.

    Example:
      >>> coefs = init(params, [tv_a, tv_b])          # {"dense": {"kernel": (2,), ...}}
      >>> theta = compose(params, [tv_a, tv_b], coefs)  # == params

    References:
      aTLAS (NeurIPS 2024): coefficients are initialised to zero.
    """
    spec = blocks(pretrained) if spec is None else spec
    _check_spec(pretrained, spec)
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    ct.check_same_structure(pretrained, tvs, names=("pretrained", "task_vectors"), b_leading=(t,))
    return _nest({n: jnp.zeros(spec.coefficient_shape(n, t), dtype) for n in spec.names})


# ----------------------------------------------------------------------------- compose


def _accum(theta0_dtype: Any, lam_dtype: Any) -> jnp.dtype:
    return jnp.promote_types(ct.accum_dtype(theta0_dtype), ct.accum_dtype(lam_dtype))


def _leaf_forward(theta0, tau, lam, mask):
    acc = _accum(theta0.dtype, lam.dtype)
    out = theta0.astype(acc)
    lam = lam.astype(acc)
    for t in range(tau.shape[0]):  # slice by slice: one fused pass, no [T, ...] temporary
        scale = lam[t] if mask is None else jnp.take(lam[t], mask.astype(jnp.int32))
        out = out + scale * tau[t].astype(acc)
    return out.astype(theta0.dtype)


def _coefficient_grad(tau, g, mask, k, acc):
    """``<g, τ_t>`` for every t (``[T]``), or per group of ``mask`` (``[T, K]``).

    Unpartitioned: one broadcast-multiply-reduce over the stacked τ, which XLA fuses into a
    single pass (per-t Python slices ``tau[t]`` are materialised as copies by XLA:CPU).
    Partitioned: a loop over t (``lax.map``) with a segment sum per slice, so the
    temporaries stay one leaf in size. With half-precision τ the cast happens inside the
    fused read (on XLA:CPU: no temporary), provided it is not shared with the
    forward pass's cast (see the barrier in the backward of :func:`_make_leaf_op`).
    """
    g = g.astype(acc)
    if mask is None:
        return jnp.sum(tau.astype(acc) * g[None], axis=tuple(range(1, tau.ndim)))
    seg = mask.reshape(-1).astype(jnp.int32)

    def one(tau_t):
        prod = (tau_t.astype(acc) * g).reshape(-1)
        return jax.ops.segment_sum(prod, seg, num_segments=k)

    return jax.lax.map(one, tau)


def _composed(theta0, tau, lam, mask):
    """The composed leaf; with half-precision τ it is written once, behind a barrier.

    The barrier stops XLA from fusing the cast-and-accumulate over the T slices into the
    leaf's consumers, where it can be evaluated more than once (on XLA:CPU). A float32 τ has
    no cast to repeat, and there the barrier only costs fusions, so it goes without one
    (``docs/results/atlas.md`` holds the step times).
    """
    out = _leaf_forward(theta0, tau, lam, mask)
    if jnp.dtype(tau.dtype).itemsize < jnp.dtype(_accum(theta0.dtype, lam.dtype)).itemsize:
        out = jax.lax.optimization_barrier(out)
    return out


def _make_leaf_op(k: int | None):
    """A custom-VJP ``(θ0, τ[T], Λ, mask) -> θ`` for one leaf (mask only when k is set)."""

    @jax.custom_vjp
    def op(theta0, tau, lam, mask):
        return _composed(theta0, tau, lam, mask)

    def fwd(theta0, tau, lam, mask):
        mask = None if mask is None else mask.value  # None (no partitions) is not wrapped
        out = _composed(theta0.value, tau.value, lam.value, mask)
        # Only what the backward needs; zero-size arrays carry dtypes and "perturbed" flags.
        res = (
            tau.value,
            lam.value,
            mask,
            jnp.zeros((0,), theta0.value.dtype) if theta0.perturbed else None,
            jnp.zeros((0,), tau.value.dtype) if tau.perturbed else None,
        )
        return out, res

    def bwd(res, g):
        tau, lam, mask, theta0_flag, tau_flag = res
        # Without the barrier XLA:CPU shares the forward pass's float32 conversion of a
        # half-precision τ with this pass, holding a float32 copy of every task vector
        # through the model's backward pass (time and peak memory in docs/results/atlas.md;
        # with the barrier, the fused read of τ).
        tau = jax.lax.optimization_barrier(tau)
        acc = _accum(g.dtype, lam.dtype)
        dlam = _coefficient_grad(tau, g, mask, k, acc).astype(lam.dtype)
        dtheta0 = None if theta0_flag is None else g.astype(theta0_flag.dtype)
        dtau = None
        if tau_flag is not None:  # exact, but T copies of the leaf: only when asked for
            lam_a, g_a = lam.astype(acc), g.astype(acc)
            rows = []
            for t in range(tau.shape[0]):
                scale = lam_a[t] if mask is None else jnp.take(lam_a[t], mask.astype(jnp.int32))
                rows.append(scale * g_a)
            dtau = jnp.stack(rows).astype(tau_flag.dtype)
        return dtheta0, dtau, dlam, None

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


_UNPARTITIONED_OP = _make_leaf_op(None)


@functools.cache
def _partitioned_op(k: int):
    return _make_leaf_op(k)


def _check_finite_coefficients(flat: dict[str, Any]) -> None:
    """Concrete coefficients (an eager call) must be finite: a NaN coefficient makes its
    block NaN. Traced ones (inside a step) are the step's to check."""
    if any(isinstance(v, jax.core.Tracer) for v in flat.values()):
        return
    ok = jax.device_get({n: jnp.all(jnp.isfinite(v)) for n, v in flat.items()})
    bad = [n for n, good in ok.items() if not good]
    if bad:
        raise ValueError(f"coefficients[{bad[0]!r}] holds NaN or Inf")


def compose(
    pretrained: Params,
    task_vectors: Sequence[Params] | Params,
    coefficients: PyTree,
    spec: Blocks | None = None,
    *,
    masks: Sequence[Any] | None = None,
    implementation: str | None = None,
) -> Params:
    """Composes θ_b = θ0_b + Σ_t Λ[t, b] · τ_{t, b} for every block b.

    Pure and jit-able. Task vectors may be stored in bfloat16/float16; the sum is
    accumulated in float32 (float64 when θ0 or Λ is float64) and cast to the dtype of each
    pretrained leaf. Leaves that are not composed come back unchanged.

    Gradients (``jax.custom_vjp``): the cotangent of Λ[t, b] is ``<dL/dθ_b, τ_{t, b}>``
    (summed over a partition group for ``[T, K]`` blocks), computed leaf by leaf from the
    one cotangent ``dL/dθ``; no T-fold activations or parameter copies. The cotangents of
    θ0 (``dL/dθ``) and of the task vectors (``Λ[t]·dL/dθ``) are exact too, and are only
    computed when those inputs are differentiated (``symbolic_zeros``), so a step that
    trains Λ alone pays nothing for them.

    Args:
      pretrained: θ0, any pytree of arrays.
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees of the
        pretrained structure.
      coefficients: the tree returned by :func:`init` (nested dict of block names).
      spec: the block layout the coefficients were made for (default: one block per
        floating-point leaf, no partitions).
      masks: for partitioned layouts, the output of :func:`partition_masks` (computed here
        when omitted; pass it explicitly under ``jit`` for large models, or the masks become
        constants of the compiled program).
      implementation: ``None`` (the Pallas kernels of :mod:`cljax.kernels` on GPU/TPU: a
        fused ``weighted_sum`` forward whose coefficient gradient is the one-pass
        ``block_dots``; this XLA code on the CPU), ``"xla"`` or ``"pallas"``.

    Returns:
      The composed parameters, with the structure and dtypes of ``pretrained``.

    Raises:
      ValueError: if the task vectors or the coefficients do not match (naming the first
        differing path or block), the layout was built for another tree, or (concrete
        coefficients only: an eager call) a coefficient is NaN or Inf.

    Example:
      >>> spec = blocks(params)
      >>> coefs = init(params, tvs, spec)
      >>> loss = lambda c: loss_fn(compose(params, tvs, c, spec), batch)
      >>> grads = jax.grad(loss)(coefs)   # <dL/dθ_b, τ_t,b> for every t, b

    References:
      aTLAS (NeurIPS 2024), Eq. (2) and ``src/composition.py``.
    """
    spec = blocks(pretrained) if spec is None else spec
    leaves = _check_spec(pretrained, spec)
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    ct.check_same_structure(pretrained, tvs, names=("pretrained", "task_vectors"), b_leading=(t,))
    flat = _flat_coefficients(coefficients)
    for n in spec.names:
        if n not in flat:
            raise ValueError(f"coefficients has no entry for block {n!r}")
        want = spec.coefficient_shape(n, t)
        if tuple(np.shape(flat[n])) != want:
            raise ValueError(
                f"coefficients[{n!r}] has shape {tuple(np.shape(flat[n]))}, expected {want} "
                f"(T={t} task vectors" + (f", K={spec.partitions})" if want[1:] else ")")
            )
        if not ct.is_float(flat[n]):
            raise ValueError(f"coefficients[{n!r}] must be floating point, got {flat[n].dtype}")
    extra = [n for n in flat if n not in set(spec.names)]
    if extra:
        raise ValueError(f"coefficients has an entry {extra[0]!r} that is no block of the layout")
    _check_finite_coefficients(flat)
    if any(spec.partitioned):
        if masks is None:
            masks = partition_masks(pretrained, spec)
        masks = list(masks)
        if len(masks) != len(leaves):
            raise ValueError(f"masks has {len(masks)} entries for {len(leaves)} leaves")
    else:
        masks = [None] * len(leaves)  # read for partitioned blocks only
    tv_leaves = jax.tree.leaves(tvs)
    names = spec.names
    impl = kernels.resolve_implementation(implementation, where="atlas.compose")
    out = []
    if impl == "pallas":  # every composed leaf in one call: a few kernels for the whole model
        idx = [i for i, b in enumerate(spec.block_of) if b >= 0]
        ys = kernels.weighted_sum_leaves(
            [jnp.asarray(leaves[i][1]) for i in idx],
            [tv_leaves[i] for i in idx],
            [flat[names[spec.block_of[i]]] for i in idx],
            [jnp.asarray(masks[i]) if spec.partitioned[spec.block_of[i]] else None for i in idx],
            implementation="pallas",
        )
        out = [x for _, x in leaves]
        for i, y in zip(idx, ys, strict=True):
            out[i] = y
        return jax.tree.unflatten(jax.tree.structure(pretrained), out)
    for i, ((_, x), tau, b) in enumerate(zip(leaves, tv_leaves, spec.block_of, strict=True)):
        if b < 0:
            out.append(x)
            continue
        lam = flat[names[b]]
        x = jnp.asarray(x)
        if spec.partitioned[b]:
            out.append(_partitioned_op(spec.partitions)(x, tau, lam, jnp.asarray(masks[i])))
        else:
            out.append(_UNPARTITIONED_OP(x, tau, lam, None))
    return jax.tree.unflatten(jax.tree.structure(pretrained), out)


# ----------------------------------------------------------------------------- objectives

LogitsFn = Callable[[Params, Any], jax.Array]
LossFn = Callable[[Params, Any, jax.Array], Any]


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _acc(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def supervised_objective(logits_fn: LogitsFn) -> LossFn:
    """Cross-entropy on labelled batches ``{"x", "y"}`` (few-shot aTLAS).

    Args:
      logits_fn: ``logits_fn(params, batch) -> [batch, classes]`` (model and frozen head;
        the batch dict may carry more than ``"x"``, e.g. the head's parameters).

    Returns:
      ``loss_fn(params, batch, key) -> (loss, {"accuracy"})`` for :func:`fit`.

    References:
      aTLAS (NeurIPS 2024), few-shot learning (``src/learn_few_shots.py``).
    """

    def loss_fn(params, batch, key):
        del key
        logits = logits_fn(params, batch)
        return _ce(logits, batch["y"]), {"accuracy": _acc(logits, batch["y"])}

    return loss_fn


def task_addition_objective(apply_fns: Sequence[LogitsFn]) -> LossFn:
    """Σ_t CE_t: each task's sub-batch goes through its own frozen head.

    Args:
      apply_fns: one ``logits_fn(params, sub_batch)`` per task (shared encoder, task head);
        the same function may serve every task when the sub-batch carries its head.

    Returns:
      ``loss_fn(params, batches, key)`` where ``batches`` is a sequence of ``{"x", "y"}``,
      one per task, in the order of ``apply_fns``; aux holds ``ce_<t>`` per task.

    Raises:
      ValueError: if ``apply_fns`` is empty.

    References:
      aTLAS (NeurIPS 2024), task addition (``src/learn_task_addition.py``).
    """
    apply_fns = tuple(apply_fns)
    if not apply_fns:
        raise ValueError("apply_fns is empty: task addition needs at least one task")

    def loss_fn(params, batches, key):
        del key
        if len(batches) != len(apply_fns):
            raise ValueError(f"got {len(batches)} sub-batches for {len(apply_fns)} tasks")
        ces = [_ce(f(params, b), b["y"]) for f, b in zip(apply_fns, batches, strict=True)]
        return sum(ces), {f"ce_{i}": c for i, c in enumerate(ces)}

    return loss_fn


def task_negation_objective(target_fn: LogitsFn, control_fn: LogitsFn) -> LossFn:
    """−CE(target) + CE(control): forget the target task, keep the control task.

    Args:
      target_fn: ``logits_fn(params, batch)`` of the task to forget.
      control_fn: ``logits_fn(params, batch)`` of the control task.

    Returns:
      ``loss_fn(params, {"target": batch, "control": batch}, key)``.

    References:
      aTLAS (NeurIPS 2024), task negation (``src/learn_task_negation.py``).
    """

    def loss_fn(params, batch, key):
        del key
        ce_t = _ce(target_fn(params, batch["target"]), batch["target"]["y"])
        ce_c = _ce(control_fn(params, batch["control"]), batch["control"]["y"])
        return -ce_t + ce_c, {"ce_target": ce_t, "ce_control": ce_c}

    return loss_fn


def entropy_objective(logits_fn: LogitsFn) -> LossFn:
    """Unsupervised test-time adaptation by entropy minimisation on batches ``{"x"}``.

    References:
      Wang et al., Tent, ICLR 2021; aTLAS (NeurIPS 2024), test-time adaptation.
    """

    def loss_fn(params, batch, key):
        del key
        return entropy_loss(logits_fn(params, batch))

    return loss_fn


def pseudo_label_objective(
    logits_fn: LogitsFn,
    *,
    threshold: float = 0.99,
    hard: bool = False,
    normalize: Literal["confident", "batch"] = "confident",
) -> LossFn:
    """Unsupervised FixMatch-style objective on batches ``{"weak", "strong"}`` (two views).

    ``logits_fn(params, batch)`` is called with the batch whose ``"x"`` is each view in
    turn. See :func:`cljax.losses.pseudo_label_loss` for the arguments.

    Raises:
      ValueError: on a threshold outside [0, 1).

    References:
      Sohn et al., FixMatch, NeurIPS 2020; aTLAS (NeurIPS 2024), ``src/learn_ufm.py``.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{threshold=} must be in [0, 1)")

    def loss_fn(params, batch, key):
        del key
        weak = logits_fn(params, {**batch, "x": batch["weak"]})
        strong = logits_fn(params, {**batch, "x": batch["strong"]})
        loss = pseudo_label_loss(weak, strong, threshold=threshold, hard=hard, normalize=normalize)
        conf = jnp.mean(jnp.max(jax.nn.softmax(weak.astype(jnp.float32), -1), -1) > threshold)
        return loss, {"confident": conf}

    return loss_fn


def negation_score(
    control_floor: float, *, target: str = "target_accuracy", control: str = "control_accuracy"
) -> Callable[[Mapping[str, float]], float | None]:
    """Selection rule of task negation: lowest target accuracy with control ≥ a floor.

    Args:
      control_floor: the minimum control accuracy (the reference: 0.95 × zero-shot).
      target, control: metric names in the evaluation dict.

    Returns:
      ``score(metrics)``: ``-metrics[target]`` when the control constraint holds, else
      ``None`` (inadmissible), for :func:`fit`'s ``score``.
    """

    def score(m):
        return -float(m[target]) if float(m[control]) >= control_floor else None

    return score


# ----------------------------------------------------------------------------- fit


def default_optimizer(
    learning_rate: float | optax.Schedule = 1e-3,
    *,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """The reference's optimiser of Λ: gradient clipping 1.0, AdamW lr 1e-3, weight decay 0.1.

    Weight decay acts on Λ, so it pulls the composition back toward θ0.

    Raises:
      ValueError: on a non-positive constant learning rate or clip norm, or negative decay.
    """
    if not callable(learning_rate) and learning_rate <= 0:
        raise ValueError(f"{learning_rate=} must be positive")
    if weight_decay < 0:
        raise ValueError(f"{weight_decay=} must be >= 0")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"{clip_norm=} must be positive or None")
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    return tx if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), tx)


def few_shot_optimizer(
    total_steps: int, learning_rate: float = 0.1, *, weight_decay: float = 0.1
) -> optax.GradientTransformation:
    """Few-shot defaults of the reference: AdamW lr 0.1, cosine decay without warm-up, clip 1.0.

    Raises:
      ValueError: if ``total_steps`` < 1.
    """
    if total_steps < 1:
        raise ValueError(f"{total_steps=} must be >= 1")
    return default_optimizer(
        optax.cosine_decay_schedule(learning_rate, total_steps), weight_decay=weight_decay
    )


_compose_jit = jax.jit(compose, static_argnums=(3,))


@functools.lru_cache(maxsize=64)
def _train_step(loss_fn: LossFn, spec: Blocks, has_aux: bool):
    """One compiled step per (objective, layout): repeated fits do not recompile.

    θ0, the task vectors, the masks and the batch are arguments of the step, so they may
    change between fits (another held-out task, another head carried in the batch) as long
    as their shapes do not.
    """

    def objective(c, packed, key):
        batch, theta0, taus, ms = packed
        return loss_fn(compose(theta0, taus, c, spec, masks=ms), batch, key)

    return make_step(objective, has_aux=has_aux)


@functools.lru_cache(maxsize=64)
def _split_train_step(loss_fn: LossFn, spec: Blocks, has_aux: bool):
    """:func:`_train_step` as three compiled programs: compose; the model's value and
    gradient at θ; the coefficient gradient (the VJP of :func:`compose`) and the update.

    The same arithmetic as the one-program step (bit-identical coefficients on the CPU);
    on XLA:CPU the one program spends more CPU time on the same fusions
    (``experiments/benchmarks/atlas_bench.py`` measures both). The update and metrics are
    :func:`cljax.train.apply_step`'s, as in :func:`cljax.train.make_step`.
    """
    compose_fn = jax.jit(lambda theta0, taus, c, ms: compose(theta0, taus, c, spec, masks=ms))
    model_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=has_aux))

    def update(state, theta0, taus, ms, g, out, key):
        _, vjp = jax.vjp(lambda c: compose(theta0, taus, c, spec, masks=ms), state.params)
        (grads,) = vjp(g)
        return apply_step(state, key, out, grads, has_aux=has_aux)

    update = jax.jit(update, donate_argnums=(0,))

    def step(state: TrainState, packed):
        batch, theta0, taus, ms = packed
        key, sub = jax.random.split(state.key)
        theta = compose_fn(theta0, taus, state.params, ms)
        out, g = model_grad(theta, batch, sub)
        del theta  # not needed by the update: free it before the τ pass
        return update(state, theta0, taus, ms, g, out, key)

    return raise_on_nonfinite(step)  # as make_step's default: a non-finite step raises


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      coefficients: the coefficients of the best epoch (epoch 0 = the initial ones).
      best_epoch: the epoch they come from.
      best_score: their score (``None`` if no epoch was admissible; then epoch 0 is kept).
      history: one dict per evaluated epoch: ``epoch``, ``score``, the evaluation metrics
        and the mean training loss.
      final_coefficients: the coefficients after the last step.
    """

    coefficients: PyTree
    best_epoch: int
    best_score: float | None
    history: list[dict]
    final_coefficients: PyTree


def fit(
    loss_fn: LossFn,
    pretrained: Params,
    task_vectors: Sequence[Params] | Params,
    batch_at: Callable[[int], Any],
    *,
    epochs: int,
    steps_per_epoch: int,
    spec: Blocks | None = None,
    coefficients: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
    evaluate: Callable[[Params], Mapping[str, float]] | None = None,
    score: str | Callable[[Mapping[str, float]], float | None] = "accuracy",
    stop: Callable[[Mapping[str, float]], bool] | None = None,
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    split_step: bool | None = None,
) -> FitResult:
    """Learns aTLAS coefficients Λ with optax, keeping the best epoch by a validation score.

    Model-agnostic: ``loss_fn`` sees composed parameters, so any model, head layout or
    objective works (see :func:`task_addition_objective`, :func:`task_negation_objective`,
    :func:`supervised_objective`, :func:`entropy_objective`,
    :func:`pseudo_label_objective`). Only Λ is trained; θ0 and the task vectors are
    arguments of the compiled step (not constants), and the step donates Λ and the
    optimiser state.

    After every epoch (and once before training, as the baseline), ``evaluate`` gets the
    composed parameters and returns metrics; ``score`` turns them into a number (higher is
    better, ``None`` = inadmissible) and the best epoch's coefficients are kept. ``stop``
    ends training early (task negation stops once control accuracy falls below its floor).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> loss`` or ``(loss, aux_dict)``.
      pretrained: θ0.
      task_vectors: T task vectors (stacked or a list).
      batch_at: ``batch_at(step) -> batch`` (random access, e.g. ``Task.batch_at``).
      epochs: number of epochs (>= 1).
      steps_per_epoch: steps per epoch (>= 1).
      spec: block layout (default: one block per leaf).
      coefficients: initial Λ (default :func:`init`, zeros).
      optimizer: default :func:`default_optimizer` (AdamW 1e-3, wd 0.1, clip 1.0).
      evaluate: ``evaluate(params) -> {metric: value}``; without it the last epoch is kept.
      score: a metric name or ``score(metrics) -> float | None``.
      stop: ``stop(metrics) -> bool`` checked after each evaluation.
      seed: integer seed of the PRNG key passed (split per step) to ``loss_fn``.
      progress: optional wrapper of the step iterator (a progress bar).
      checkpoint_dir: if given, the whole fit (coefficients, optimiser state, PRNG key,
        step, best-so-far coefficients, epoch and score, history) is saved there after
        every epoch, and a re-run with the same folder resumes; the result is
        bit-identical to an uninterrupted fit (on CPU). A finished fit only reloads.
      checkpoint_every: with ``checkpoint_dir``, also save every ``checkpoint_every``
        steps inside epochs (the losses of the epoch so far included).
      split_step: run each step as three compiled programs (compose; the model's forward
        and backward at θ; the coefficient gradient and update) instead of one. Same
        results; on XLA:CPU it is faster (``experiments/benchmarks/atlas_bench.py``).
        ``None``: split on the CPU, one program on accelerators.

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: on ``epochs`` or ``steps_per_epoch`` < 1, mismatched inputs, initial
        ``coefficients`` holding NaN or Inf, a
        ``checkpoint_every`` that is not a positive int or comes without
        ``checkpoint_dir``, or a checkpoint of a fit with another ``steps_per_epoch`` or
        ``seed``.
      cljax.train.NonFiniteError: at the first step whose loss or coefficient gradient is
        not finite, naming it (the update is not applied and nothing is checkpointed).

    Example:
      >>> spec = blocks(params)
      >>> res = fit(supervised_objective(apply), params, tvs, task.batch_at,
      ...           epochs=10, steps_per_epoch=4, spec=spec,
      ...           evaluate=lambda p: {"accuracy": val_acc(p)})
      >>> theta = compose(params, tvs, res.coefficients, spec)

    References:
      aTLAS (NeurIPS 2024), ``src/learn_task_addition.py``, ``src/learn_few_shots.py``.
    """
    if epochs < 1:
        raise ValueError(f"{epochs=} must be >= 1")
    if steps_per_epoch < 1:
        raise ValueError(f"{steps_per_epoch=} must be >= 1")
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int | np.integer):
            raise ValueError(f"fit: {checkpoint_every=} must be a positive int (steps) or None")
        if checkpoint_every < 1:
            raise ValueError(f"fit: {checkpoint_every=} must be a positive int (steps) or None")
        if checkpoint_dir is None:
            raise ValueError(f"fit: {checkpoint_every=} needs a checkpoint_dir to write to")
    spec = blocks(pretrained) if spec is None else spec
    tvs = ct.as_stacked(task_vectors)
    coefs = init(pretrained, tvs, spec) if coefficients is None else coefficients
    masks = None
    if any(spec.partitioned):  # on the device once, not with every step's arguments
        on_device: dict[int, jax.Array] = {}  # blocks of one shape share one mask
        masks = [
            None if m is None else on_device.setdefault(id(m), jnp.asarray(m))
            for m in partition_masks(pretrained, spec)
        ]
    _compose_jit(pretrained, tvs, coefs, spec, masks=masks)  # validates eagerly
    _check_finite_coefficients(_flat_coefficients(coefs))
    score_fn = (lambda m: float(m[score])) if isinstance(score, str) else score
    tx = default_optimizer() if optimizer is None else optimizer
    first = batch_at(0)  # outside the trace: batch_at may do host work (decoding, resizing)
    probe = jax.eval_shape(
        lambda c, k, b: loss_fn(compose(pretrained, tvs, c, spec, masks=masks), b, k),
        coefs,
        jax.random.key(0),
        first,
    )
    if split_step is None:
        split_step = jax.default_backend() == "cpu"
    make = _split_train_step if split_step else _train_step
    step = make(loss_fn, spec, isinstance(probe, tuple))
    state = TrainState.create(jax.tree.map(jnp.array, coefs), tx, key=seed)

    def run_eval(c):
        if evaluate is None:
            return {}
        theta = _compose_jit(pretrained, tvs, c, spec, masks=masks)
        return {k: float(v) for k, v in evaluate(theta).items()}

    ckpt = None if checkpoint_dir is None else CheckpointManager(checkpoint_dir, keep=2)
    identity = {"steps_per_epoch": steps_per_epoch, "seed": seed}
    start, losses0, stopped = 0, [], False
    history: list[dict[str, Any]]
    restored = None if ckpt is None else ckpt.restore_latest({"state": state, "best": coefs})
    if restored is not None:
        start, tree, meta = restored
        if any(meta.get(k) != v for k, v in identity.items()):
            saved = {k: meta.get(k) for k in identity}
            raise ValueError(
                f"fit: checkpoint in {checkpoint_dir} is of another fit ({saved}); "
                f"this fit has {identity} (use another folder)"
            )
        state, history = tree["state"].replace(tx=tx), meta["history"]
        best: tuple[Any, int, float | None] = (tree["best"], meta["best_epoch"], meta["best_score"])
        losses0 = [np.asarray(v, meta["loss_dtype"]) for v in meta["losses"]]
        stopped = meta["stopped"]
    else:
        history = []
        m0 = run_eval(state.params)
        s0 = score_fn(m0) if evaluate is not None else None
        history.append({"epoch": 0, "score": s0, **m0})
        best = (jax.tree.map(jnp.array, state.params), 0, s0)

    def save(ckpt: CheckpointManager, done: int, losses: list, stopped: bool = False) -> None:
        host = [np.asarray(v) for v in jax.device_get(losses)]
        meta = {
            "history": history,
            "best_epoch": best[1],
            "best_score": best[2],
            "losses": [float(v) for v in host],
            "loss_dtype": str(host[0].dtype) if host else "float32",
            "stopped": stopped,
            **identity,
        }  # numpy scalars (a score function's) as plain numbers
        meta = json.loads(json.dumps(meta, default=lambda v: np.asarray(v).item()))
        if ckpt.path(done).exists():  # one the restore skipped: moved aside, not lost
            try:
                ckpt.verify(done)
            except CheckpointCorruptError:
                pass  # the save moves a damaged one aside itself
            else:
                ckpt.quarantine(done, f"checkpoint {done} is ahead of the resumed fit")
        ckpt.save(done, {"state": state, "best": best[0]}, metadata=meta)

    for epoch in range(start // steps_per_epoch + 1, epochs + 1):
        if stopped:
            break
        first, end = max((epoch - 1) * steps_per_epoch, start), epoch * steps_per_epoch
        losses: list[Any] = list(losses0) if first > (epoch - 1) * steps_per_epoch else []
        it = range(first, end)
        for s in progress(it) if progress is not None else it:
            state, metrics = step(state, (batch_at(s), pretrained, tvs, masks))
            losses.append(metrics["loss"])
            if ckpt is not None and checkpoint_every is not None and s + 1 < end:
                if (s + 1) % checkpoint_every == 0:
                    save(ckpt, s + 1, losses)
        m = run_eval(state.params)
        sc = score_fn(m) if evaluate is not None else float(-np.mean(jax.device_get(losses)))
        history.append(
            {"epoch": epoch, "score": sc, "train_loss": float(np.mean(jax.device_get(losses))), **m}
        )
        if sc is not None and (best[2] is None or sc > best[2] or evaluate is None):
            best = (jax.tree.map(jnp.array, state.params), epoch, sc)
        stopped = stop is not None and evaluate is not None and bool(stop(m))
        if ckpt is not None:
            save(ckpt, end, [], stopped)
    if evaluate is None:  # no validation: keep the last epoch
        best = (state.params, history[-1]["epoch"], history[-1]["score"])
    return FitResult(best[0], best[1], best[2], history, state.params)
