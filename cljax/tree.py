"""Pytree helpers beyond ``optax.tree``: stacking, path rules, validation, casts.

Every cljax method takes parameters as an arbitrary pytree of arrays. This module holds
the few conventions they all share:

* **Paths** are the ``/``-joined keys of :func:`jax.tree_util.tree_flatten_with_path`
  (``"params/Dense_0/kernel"``). :func:`path_str` builds one, :func:`paths` lists them.
  The attribute key under which a ``flax.nnx`` variable holds its array (``.../value``)
  is dropped, so an ``nnx.State`` has the paths of the matching linen params
  (``"linear/kernel"``, not ``"linear/kernel/value"``) and one rule selects the same
  leaves in both.
* **Stacked sets**: T trees of one structure are held as one tree whose leaves have a
  leading axis of size T (:func:`stack`, :func:`unstack`, :func:`as_stacked`).
* **Path rules** are ordered ``(regex, value)`` pairs; the first regex that
  :func:`re.search`-matches a leaf's path gives that leaf its value (:func:`rule_values`,
  :func:`rule_mask`). A rule that selects no leaf is an error naming the rule and a few
  paths (a rule written for another layout would otherwise be a silent no-op).
  :func:`describe_rules` prints what each rule selected.
* **Validation** raises :class:`ValueError` naming the first differing path
  (:func:`check_same_structure`, :func:`check_finite`), and :class:`TypeError` naming the
  first leaf that is not an array (:func:`check_leaves`).
* **Accumulation dtype**: weight-space arithmetic accumulates in float32 whatever the
  storage dtype (:func:`accum_dtype`), and casts back (:func:`cast_like`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Params",
    "PyTree",
    "Rules",
    "accum_dtype",
    "as_stacked",
    "cast_like",
    "check_finite",
    "check_leaves",
    "check_same_structure",
    "describe_rules",
    "is_float",
    "leaves_with_paths",
    "map_with_path",
    "num_stacked",
    "path_str",
    "paths",
    "rule_mask",
    "rule_values",
    "stack",
    "sum_slices",
    "to_accum",
    "unstack",
    "unused_rules",
]

PyTree = Any
Params = Any
Rules = Sequence[tuple[str, Any]]


# ----------------------------------------------------------------------------- paths


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_variable_value(key: Any) -> bool:
    """The key under which an ``nnx.Variable`` (or an older ``VariableState``) flattens
    its array: an attribute key named ``value``. Dict keys named ``"value"`` are kept."""
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name in ("value", "raw_value")


def path_str(path: Sequence[Any]) -> str:
    """Joins the keys of a ``tree_flatten_with_path`` path with ``/``.

    A trailing ``flax.nnx`` variable key is dropped: the leaf of ``nnx.state(model)`` at
    ``("linear", "kernel", GetAttrKey("value"))`` has the path ``"linear/kernel"``, as the
    linen leaf ``params["linear"]["kernel"]`` does.
    """
    path = tuple(path)
    if path and _is_variable_value(path[-1]):
        path = path[:-1]
    return "/".join(_key_str(k) for k in path)


def _mixed_keys(tree: PyTree, path: tuple[str, ...] = ()) -> tuple[str, list[Any]] | None:
    """The path and keys of the first mapping in ``tree`` whose keys cannot be sorted."""
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        try:
            sorted(keys)
        except TypeError:
            return "/".join(path), keys
        children = [(str(k), v) for k, v in tree.items()]
    else:  # one level of any other node: a list, a tuple, a registered dataclass
        try:
            flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)[0]
        except Exception:  # a node that cannot even be opened: leave JAX's error as it is
            return None
        children = [(path_str(p), v) for p, v in flat if p]
    for k, v in children:
        found = _mixed_keys(v, (*path, k))
        if found is not None:
            return found
    return None


def _flatten_with_path(tree: PyTree, name: str) -> list[tuple[Any, Any]]:
    """``tree_flatten_with_path``, with a clear error for a dict whose keys mix types.

    JAX sorts a dict's keys to flatten it, so ``{0: a, "b": b}`` fails inside the sort
    with a message that names neither the tree nor the dict.
    """
    try:
        return jax.tree_util.tree_flatten_with_path(tree)[0]
    except (TypeError, ValueError) as e:
        found = _mixed_keys(tree)
        if found is None:
            raise
        where, keys = found
        types = " and ".join(sorted({type(k).__name__ for k in keys}))
        at = f"the dict at path {where!r}" if where else "its top-level dict"
        raise TypeError(
            f"{name}: {at} has keys of mixed types ({types}: "
            f"{', '.join(repr(k) for k in keys[:6])}{', ...' if len(keys) > 6 else ''}), "
            "which cannot be sorted; JAX sorts a dict's keys to flatten it, so the keys of "
            "one dict must share one type (e.g. all str)"
        ) from e


def leaves_with_paths(tree: PyTree, *, name: str = "tree") -> list[tuple[str, Any]]:
    """Returns ``[(path, leaf), ...]`` in flattening order.

    Raises:
      TypeError: naming ``name`` and the dict's path, for a dict whose keys mix types
        (``{0: a, "b": b}``), which JAX cannot flatten.
    """
    return [(path_str(p), leaf) for p, leaf in _flatten_with_path(tree, name)]


def paths(tree: PyTree) -> list[str]:
    """The ``/``-joined path of every leaf, in flattening order."""
    return [p for p, _ in leaves_with_paths(tree)]


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like ``jax.tree.map`` but ``fn(path, leaf, *others)`` receives the ``/``-joined path."""
    return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)


# ----------------------------------------------------------------------------- stacking


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks T trees of one structure into one tree with a leading axis of size T.

    Raises:
      ValueError: if ``trees`` is empty, or two trees differ in structure or leaf shape
        (the message names the first differing path).
    """
    trees = list(trees)
    if not trees:
        raise ValueError("stack: got an empty sequence of trees; need at least one")
    for i, t in enumerate(trees[1:], start=1):
        check_same_structure(trees[0], t, names=("trees[0]", f"trees[{i}]"))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: splits the leading axis into a list of T trees."""
    n = num_stacked(tree)
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def num_stacked(tree: PyTree) -> int:
    """The size T of the leading axis shared by all leaves of a stacked tree.

    Raises:
      ValueError: if the tree has no leaves, a leaf is a scalar, leaves disagree on T, or
        T is 0 (a stacked set holds at least one tree).
      TypeError: if a leaf is not an array (:func:`check_leaves`).
    """
    pl = leaves_with_paths(tree, name="stacked tree")
    if not pl:
        raise ValueError("stacked tree has no leaves")
    check_leaves(tree, name="stacked tree")
    sizes = {}
    for p, x in pl:
        shape = np.shape(x)
        if len(shape) == 0:
            raise ValueError(f"stacked tree: leaf {p!r} is a scalar, expected a leading task axis")
        sizes.setdefault(shape[0], p)
    if len(sizes) > 1:
        desc = ", ".join(f"{n} at {p!r}" for n, p in sizes.items())
        raise ValueError(f"stacked tree: leaves disagree on the leading (task) axis: {desc}")
    t = next(iter(sizes))
    if t == 0:
        at = f" at {sizes[0]!r}" if sizes[0] else ""
        raise ValueError(
            f"stacked tree has T=0 (a leading axis of size 0{at}); a stacked set needs at "
            "least one tree"
        )
    return t


def as_stacked(trees: Sequence[PyTree] | PyTree, *, name: str = "task_vectors") -> PyTree:
    """Accepts a Python list/tuple of trees (stacked here) or an already stacked tree.

    A ``list`` or ``tuple`` at the top level is always read as a sequence of T trees; pass
    any other container (a dict, an ``nnx.State``) for a stacked tree.

    Raises:
      ValueError: on an empty sequence, mismatched trees or a stacked tree with T = 0,
        naming ``name``.
      TypeError: if a leaf is not an array (:func:`check_leaves`), naming ``name``.
    """
    if isinstance(trees, list | tuple):
        if len(trees) == 0:
            raise ValueError(f"{name}: got an empty list; need at least one tree")
        try:
            return stack(trees)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
    try:
        num_stacked(trees)  # validates leaf types and a common leading axis T >= 1
    except (ValueError, TypeError) as e:
        raise type(e)(f"{name}: {e}") from None
    return trees


# ----------------------------------------------------------------------------- validation


def check_same_structure(
    a: PyTree,
    b: PyTree,
    *,
    names: tuple[str, str] = ("a", "b"),
    check_shapes: bool = True,
    b_leading: tuple[int, ...] = (),
) -> None:
    """Raises ``ValueError`` naming the first path where ``a`` and ``b`` differ.

    Leaves must be arrays: a string or a Python number raises ``TypeError`` naming its path
    (:func:`check_leaves`).

    Args:
      a, b: pytrees to compare.
      names: how the two trees are called in the message.
      check_shapes: also compare leaf shapes.
      b_leading: leading axes that ``b``'s leaves carry in addition to ``a``'s shapes
        (``(T,)`` to compare a tree against a stacked tree).
    """
    check_leaves(a, name=names[0])
    check_leaves(b, name=names[1])
    pa, pb = leaves_with_paths(a), leaves_with_paths(b)
    da, db = dict(pa), dict(pb)
    for p, _ in pa:
        if p not in db:
            raise ValueError(f"{names[1]} has no leaf at path {p!r} (present in {names[0]})")
    for p, _ in pb:
        if p not in da:
            raise ValueError(f"{names[1]} has an extra leaf at path {p!r} (absent from {names[0]})")
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError(
            f"{names[0]} and {names[1]} have the same paths but different container types: "
            f"{jax.tree.structure(a)} vs {jax.tree.structure(b)}"
        )
    if check_shapes:
        for (p, xa), (_, xb) in zip(pa, pb, strict=True):
            sa, sb = tuple(np.shape(xa)), tuple(np.shape(xb))
            if tuple(b_leading) + sa != sb:
                want = tuple(b_leading) + sa
                raise ValueError(
                    f"shape mismatch at path {p!r}: {names[0]} has {sa}, {names[1]} has {sb}"
                    + (f" (expected {want})" if b_leading else "")
                )


def _leaf_problem(x: Any) -> str | None:
    """Why ``x`` cannot be a leaf of a parameter tree, or ``None`` if it can."""
    if isinstance(x, jax.Array | jax.ShapeDtypeStruct):  # tracers and typed keys included
        return None
    if isinstance(x, np.ndarray | np.generic):
        if x.dtype.kind in "biufc":
            return None
        return f"a numpy {type(x).__name__} of dtype {x.dtype}"
    if isinstance(x, bool | int | float | complex):
        return f"a Python {type(x).__name__} ({x!r})"
    return f"a {type(x).__name__} ({x!r:.40})"


def check_leaves(tree: PyTree, *, name: str = "tree") -> None:
    """Raises ``TypeError`` naming the first leaf of ``tree`` that is not a numeric array.

    Parameters, task vectors and gradients are pytrees of arrays (``jax.Array``, numpy
    arrays and scalars of a numeric dtype, or ``jax.ShapeDtypeStruct``). A string, an object
    or a Python number as a leaf is an error here rather than an obscure one (or a silently
    converted result) later; wrap a number with ``jnp.asarray`` to use it as a leaf.
    """
    for p, x in leaves_with_paths(tree, name=name):
        problem = _leaf_problem(x)
        if problem is not None:
            raise TypeError(
                f"{name}: leaf {p!r} is {problem}, not an array; parameter trees hold arrays "
                "(jax or numpy, numeric dtype)"
            )


def check_finite(tree: PyTree, *, name: str = "tree") -> None:
    """Raises ``ValueError`` naming the first leaf that holds NaN or Inf.

    Needs concrete values: call it outside ``jit`` (merges call it when
    ``check_finite=True``, before tracing).
    """
    check_leaves(tree, name=name)
    for p, x in leaves_with_paths(tree):
        if isinstance(x, jax.core.Tracer):
            raise ValueError(f"check_finite({name}) needs concrete arrays; call it outside jit")
        if is_float(x):
            arr = np.asarray(jnp.asarray(x, jnp.float32))
            if not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise ValueError(f"{name} has {bad} non-finite value(s) at path {p!r}")


# ----------------------------------------------------------------------------- path rules


def _compile(rules: Rules) -> list[tuple[re.Pattern, Any]]:
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2):
            raise ValueError(f"rules[{i}]={rule!r} must be a (regex, value) pair")
        pattern, value = rule
        try:
            out.append((re.compile(pattern), value))
        except re.error as e:
            raise ValueError(f"rules[{i}] has an invalid regex {pattern!r}: {e}") from None
    return out


def _check_used(tree: PyTree, rules: Rules, compiled: list[tuple[re.Pattern, Any]]) -> None:
    """Raises ``ValueError`` for the first rule that selects no leaf (first match wins)."""
    all_paths = paths(tree)
    if not all_paths or not compiled:
        return
    owner: list[int] = []
    for p in all_paths:
        owner.append(next((i for i, (rx, _) in enumerate(compiled) if rx.search(p)), -1))
    used = set(owner)
    for i, (rx, value) in enumerate(compiled):
        if i in used:
            continue
        shadowed = [(p, o) for p, o in zip(all_paths, owner, strict=True) if rx.search(p)]
        rule = f"rules[{i}]=({rx.pattern!r}, {value!r})"
        if shadowed:
            p, o = shadowed[0]
            raise ValueError(
                f"{rule} selects no leaf: every path it matches is taken by an earlier rule "
                f"(e.g. {p!r} by rules[{o}]={rules[o][0]!r}); reorder or remove it"
            )
        examples = ", ".join(repr(p) for p in all_paths[:4])
        more = f", ... ({len(all_paths)} leaves)" if len(all_paths) > 4 else ""
        raise ValueError(
            f"{rule} selects no leaf; paths look like {examples}{more}. "
            "Print cljax.tree.describe_rules(tree, rules) to see what each rule selects."
        )


def rule_values(
    tree: PyTree, rules: Rules, default: Any = None, *, allow_unused: bool = False
) -> PyTree:
    """Maps each leaf to the value of the first rule whose regex matches its path.

    Args:
      tree: any pytree (linen params, an ``nnx.State``, ...; see :func:`path_str`).
      rules: ordered ``(regex, value)`` pairs; ``re.search`` on the ``/``-joined path.
      default: value of leaves that no rule matches.
      allow_unused: accept rules that select no leaf. Only for a rule set shared by
        trees of different layouts (partition rules applied to the parameters and to a
        batch); a method's own rules should select something.

    Returns:
      A tree of the structure of ``tree`` holding the values (not arrays: use it with
      ``jax.tree.map`` outside of tracing, it is static).

    Raises:
      ValueError: for a malformed rule or an invalid regex; unless ``allow_unused``, for a
        rule that selects no leaf of a non-empty tree (it matches no path, or only paths
        an earlier rule took), naming the rule and a few paths.

    Example:
      >>> rule_values({"enc": {"kernel": w}, "head": {"kernel": h}}, [("^head/", 0.0)], 1.0)
      {'enc': {'kernel': 1.0}, 'head': {'kernel': 0.0}}
    """
    compiled = _compile(rules)
    if not allow_unused:
        _check_used(tree, rules, compiled)

    def pick(p, _):
        for rx, v in compiled:
            if rx.search(p):
                return v
        return default

    # Values may be None; keep them as leaves by mapping over paths.
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return jax.tree_util.tree_unflatten(treedef, [pick(path_str(p), x) for p, x in flat])


def rule_mask(
    tree: PyTree, rules: Rules, default: bool = False, *, allow_unused: bool = False
) -> PyTree:
    """A boolean tree from rules whose values are booleans (e.g. ``[("head", False), (".*", True)]``).

    Raises:
      ValueError: as :func:`rule_values`.
    """
    return rule_values(tree, rules, default=default, allow_unused=allow_unused)


def _matches(tree: PyTree, rules: Rules) -> list[list[str]]:
    compiled = _compile(rules)
    hits: list[list[str]] = [[] for _ in compiled]
    for p in paths(tree):
        for i, (rx, _) in enumerate(compiled):
            if rx.search(p):
                hits[i].append(p)
                break
    return hits


def unused_rules(tree: PyTree, rules: Rules) -> list[str]:
    """The regexes of rules that select no leaf (first-match semantics)."""
    return [r[0] for r, h in zip(rules, _matches(tree, rules), strict=True) if not h]


def describe_rules(tree: PyTree, rules: Rules, default: Any = None) -> str:
    """A human-readable listing of which leaves each rule selected.

    Example::

      >>> print(describe_rules(params, [("head", None), (".*", 1.0)]))
      rule 0 'head' -> None: 2 leaves
          head/bias
          head/kernel
      rule 1 '.*' -> 1.0: 4 leaves
          ...
    """
    lines = []
    hits = _matches(tree, rules)
    claimed = set()
    for i, ((rx, v), h) in enumerate(zip(rules, hits, strict=True)):
        lines.append(
            f"rule {i} {rx!r} -> {v!r}: {len(h)} leaves" + ("  (matches nothing)" if not h else "")
        )
        lines.extend(f"    {p}" for p in h)
        claimed.update(h)
    rest = [p for p in paths(tree) if p not in claimed]
    if rest:
        lines.append(f"default -> {default!r}: {len(rest)} leaves")
        lines.extend(f"    {p}" for p in rest)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- dtypes


def is_float(x: Any) -> bool:
    """True for floating-point arrays (the leaves weight-space methods act on)."""
    if isinstance(x, str | bytes):  # jnp.result_type would read a string as a dtype name
        return False
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def accum_dtype(dtype: Any) -> jnp.dtype:
    """The accumulation dtype for a storage dtype: float32, or float64 if the input is."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return dtype
    return jnp.dtype(jnp.float32)


def sum_slices(xs: Sequence[jax.Array], dtype: Any = None) -> jax.Array:
    """Sums arrays one after another, each cast to ``dtype`` (default: the accumulation
    dtype of the first, :func:`accum_dtype`).

    For T task slices this is one fused elementwise loop on XLA:CPU, where a reduction over
    the leading axis of the stacked array (or a ``tensordot`` with weights) is far slower
    (``experiments/benchmarks/merge_bench.py`` measures both forms). On accelerators the
    forms cost the same.
    """
    dtype = accum_dtype(xs[0].dtype) if dtype is None else dtype
    total = xs[0].astype(dtype)
    for x in xs[1:]:
        total = total + x.astype(dtype)
    return total


def to_accum(tree: PyTree) -> PyTree:
    """Casts every floating leaf to its accumulation dtype (float32 for half precision)."""
    return jax.tree.map(lambda x: x.astype(accum_dtype(x.dtype)) if is_float(x) else x, tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda x, r: jnp.asarray(x).astype(jnp.result_type(r)), tree, like)
