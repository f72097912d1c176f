"""Shared plumbing of the merges: task-vector sets, participation masks, validation.

Every merge works on the flat list of leaves of one reference tree (the pre-trained
parameters) and, for T task vectors, on per-leaf lists of T slices. A set of task vectors may
come as a Python list of trees or as one stacked tree (leading axis T); both are
read here into :class:`TaskSet` without stacking a list (stacking would copy T models).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cljax import tree as ct
from cljax._checks import check_scalar as check_scalar  # shared with the other areas
from cljax.kernels._ties_merge import keep_count as keep_count  # TIES' one keep count

PyTree = Any


class TaskSet(NamedTuple):
    """T task vectors read leaf by leaf.

    Attributes:
      leaves: per leaf of the reference tree, either a stacked array ``(T, *shape)`` (when
        the input was a stacked tree) or a tuple of T arrays (when it was a list).
      num_tasks: T.
    """

    leaves: list[Any]
    num_tasks: int

    def slices(self, i: int) -> list[jax.Array]:
        """The T arrays of leaf ``i`` (slices of a stacked leaf fuse into their consumer)."""
        leaf = self.leaves[i]
        if isinstance(leaf, tuple):
            return list(leaf)
        return [leaf[t] for t in range(self.num_tasks)]

    def stacked(self, i: int) -> jax.Array:
        """Leaf ``i`` as one ``(T, *shape)`` array."""
        leaf = self.leaves[i]
        return jnp.stack(leaf) if isinstance(leaf, tuple) else leaf


def read_task_set(
    task_vectors: Sequence[PyTree] | PyTree,
    reference: PyTree,
    *,
    name: str = "task_vectors",
    ref_name: str = "pretrained",
) -> TaskSet:
    """Validates ``task_vectors`` against ``reference`` and reads them leaf by leaf.

    Args:
      task_vectors: a list/tuple of T trees shaped like ``reference``, or one stacked tree
        whose leaves carry a leading axis T.
      reference: the tree that fixes structure and shapes.
      name, ref_name: how the two are called in error messages.

    Raises:
      ValueError: on an empty list, or the first path where structure or shapes differ.
    """
    if isinstance(task_vectors, list | tuple):
        if len(task_vectors) == 0:
            raise ValueError(f"{name}: got an empty list; need at least one task vector")
        for t, tv in enumerate(task_vectors):
            ct.check_same_structure(reference, tv, names=(ref_name, f"{name}[{t}]"))
        per_task = [jax.tree.leaves(tv) for tv in task_vectors]
        leaves = [tuple(ls) for ls in zip(*per_task, strict=True)]
        return TaskSet(leaves, len(task_vectors))
    try:
        num = ct.num_stacked(task_vectors)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    ct.check_same_structure(
        reference, task_vectors, names=(ref_name, f"{name} (stacked)"), b_leading=(num,)
    )
    return TaskSet(jax.tree.leaves(task_vectors), num)


def reference_of(trees: Sequence[PyTree] | PyTree, name: str = "task_vectors") -> PyTree:
    """The tree that fixes structure and shapes: the first of a list, or the per-task
    shapes (``jax.ShapeDtypeStruct``) of a stacked tree."""
    if isinstance(trees, list | tuple):
        if len(trees) == 0:
            raise ValueError(f"{name}: got an empty list; need at least one tree")
        return trees[0]
    try:
        ct.num_stacked(trees)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), trees)


def check_finite_set(task_vectors: Sequence[PyTree] | PyTree, name: str = "task_vectors") -> None:
    """Raises ``ValueError`` naming the first task vector and path holding NaN/Inf."""
    if isinstance(task_vectors, list | tuple):
        for t, tv in enumerate(task_vectors):
            ct.check_finite(tv, name=f"{name}[{t}]")
    else:
        ct.check_finite(task_vectors, name=f"{name} (stacked)")


def participating(reference: PyTree, rules: ct.Rules | None) -> list[bool]:
    """Per leaf of ``reference``: whether a merge changes it.

    A leaf takes part when it is floating point and the first rule matching its path says
    ``True`` (no rules, or no matching rule: ``True``).
    """
    pl = ct.leaves_with_paths(reference)
    if rules is None:
        chosen = [True] * len(pl)
    else:
        for i, rule in enumerate(rules):
            if isinstance(rule, tuple | list) and len(rule) == 2 and not isinstance(rule[1], bool):
                raise ValueError(f"rules[{i}]={tuple(rule)!r}: the value must be a bool")
        chosen = jax.tree.leaves(ct.rule_mask(reference, rules, default=True))
    return [bool(c) and ct.is_float(x) for c, (_, x) in zip(chosen, pl, strict=True)]


def accum(x: jax.Array) -> jax.Array:
    """``x`` in its accumulation dtype (float32, or float64 for float64 inputs)."""
    return x.astype(ct.accum_dtype(x.dtype))


sum_slices = ct.sum_slices  # T arrays summed slice by slice in the accumulation dtype


def check_density(density: float, *, where: str) -> None:
    check_scalar(density, name="density", where=where, low=0.0, low_open=True, high=1.0)


def check_finite_trees(where: str, **trees: Any) -> None:
    """With concrete inputs, raises ``ValueError`` naming the first tree and path with NaN/Inf.

    A list/tuple value is checked as a set of trees (``name[t]``).
    """
    for name, tree in trees.items():
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
            raise ValueError(f"{where}: check_finite=True needs concrete arrays (not under jit)")
        try:
            if isinstance(tree, list | tuple):
                check_finite_set(tree, name=name)
            else:
                ct.check_finite(tree, name=name)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def check_choice(value: str, choices: Sequence[str], *, what: str, where: str) -> None:
    if value not in choices:
        raise ValueError(f"{where}: {what}={value!r} must be one of {tuple(choices)}")


def path_hash(path: str) -> int:
    """A stable 31-bit hash of a leaf path (for folding into PRNG keys)."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF
