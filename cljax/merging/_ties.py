"""TIES-merging: trim, elect sign, disjoint merge (Yadav et al., 2023)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from cljax import kernels
from cljax import tree as ct
from cljax.kernels._ties_merge import disjoint_merge, sign_votes, trim
from cljax.kernels._ties_threshold import ties_threshold
from cljax.merging import _common, _kth

__all__ = ["ties"]

_MERGES = ("mean", "sum")
_SCOPES = ("global", "leaf")


def ties(
    pretrained: ct.Params,
    task_vectors: Sequence[ct.Params] | ct.Params,
    *,
    density: float = 0.2,
    scale: ArrayLike = 1.0,
    merge: str = "mean",
    scope: str = "global",
    rules: ct.Rules | None = None,
    check_finite: bool = False,
    implementation: str | None = None,
):
    """TIES-merging of T task vectors into θ = θ_0 + λ·τ_m.

    1. **Trim**: per task, keep the entries with ``|τ_t| >= v_t``, where ``v_t`` is the
       k-th largest magnitude of that task's vector; entries equal to the threshold are
       all kept. With ``scope="global"`` (the paper's) N counts the entries of *all* merged
       leaves together and ``k = int(density·N) + 1``, as the paper's code counts (the
       ``(N - int(density·N))``-th smallest magnitude). ``v_t`` is found exactly by a
       bit-pattern search (a few counting passes over the leaves, no sort: the XLA
       implementation of the threshold op, :mod:`cljax.kernels._ties_threshold`). With
       ``scope="leaf"`` each leaf gets its own threshold with ``k = int(density·N_leaf)``,
       as mergekit's per-tensor magnitude trim (a different method); a leaf where that is 0
       keeps nothing, i.e. θ_0. See :func:`cljax.kernels._ties_threshold.keep_count`.
    2. **Elect**: ``γ = sign(Σ_t τ̂_t)`` (magnitude-weighted vote); coordinates where the
       sum is 0 take the majority sign ``sign(Σ_p γ_p)`` over all merged entries.
    3. **Disjoint merge**: at each coordinate, combine only the trimmed values whose sign
       agrees with γ: their mean (``merge="mean"``, count clamped to at least 1; the paper's
       convention, use λ ≈ 1, grid 0.8–2.5) or their sum (``merge="sum"``; the
       AdaMerging/FusionBench convention, use λ ≈ 0.3).

    Called on concrete arrays, the passes over the leaves run from Python as small programs
    compiled once per leaf shape (far less to compile for models that repeat a few shapes);
    under ``jax.jit`` the merge is one computation with code for every leaf. λ and the
    density are data of the compiled programs: a sweep over them compiles once.

    Args:
      pretrained: θ_0, any pytree of arrays.
      task_vectors: T task vectors, a list of trees or one stacked tree (leading axis T).
      density: fraction of entries kept per task, in (0, 1]; the paper's ``top-20%`` is 0.2.
      scale: λ, a Python number or (traced) scalar.
      merge: ``"mean"`` (dis-mean) or ``"sum"`` (dis-sum).
      scope: ``"global"`` (threshold over the whole tree) or ``"leaf"`` (per leaf).
      rules: optional path rules ``[(regex, bool), ...]``; excluded and integer leaves keep
        the value of ``pretrained`` and do not count in N.
      check_finite: raise if an input or the result holds NaN/Inf (needs concrete arrays:
        not under jit).
      implementation: ``None`` (the Pallas path :func:`cljax.kernels.ties` on GPU/TPU, this
        XLA code on the CPU), ``"xla"`` or ``"pallas"``. The Pallas path serves
        ``scope="global"``; ``scope="leaf"`` always runs this XLA code.

    Returns:
      The merged tree with the structure and dtypes of ``pretrained`` (float32 arithmetic).

    Raises:
      ValueError: for density outside (0, 1] or not a real scalar (``True``), a ``scale``
        that is not a finite real scalar, an unknown ``merge`` or ``scope``, an empty
        list of task vectors, mismatched trees (first path named), or non-finite inputs
        when ``check_finite=True``.

    Example:
      >>> merged = ties(theta0, [tau_a, tau_b, tau_c], density=0.2, scale=1.0)

    References:
      Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
      NeurIPS 2023.
    """
    _common.check_density(density, where="ties")
    density = float(density)  # a numpy scalar counts as a Python float
    _common.check_scalar(scale, name="scale", where="ties")
    if isinstance(scale, int):  # one compiled merge serves int and float λ alike
        scale = float(scale)
    _common.check_choice(merge, _MERGES, what="merge", where="ties")
    _common.check_choice(scope, _SCOPES, what="scope", where="ties")
    ts = _common.read_task_set(task_vectors, pretrained)
    if check_finite:
        _common.check_finite_trees("ties", pretrained=pretrained, task_vectors=task_vectors)

    def finish(tree):
        if check_finite:
            _common.check_finite_trees("ties", result=tree)
        return tree

    mask = tuple(_common.participating(pretrained, rules))
    pre, treedef = jax.tree.flatten(pretrained)
    if not any(mask):
        return finish(pretrained)
    sizes = [p.size for p, m in zip(pre, mask, strict=True) if m]
    if scope == "global":
        ks = [_common.keep_count(density, sum(sizes), scope="global")]
    else:
        ks = [_common.keep_count(density, n, scope="leaf") for n in sizes]
    impl = kernels.resolve_implementation(implementation, where="ties")
    if impl == "pallas" and scope == "global":
        idx = [i for i, m in enumerate(mask) if m]
        merged = kernels.ties(  # dicts keyed by leaf index: a top-level list means T trees
            {i: pre[i] for i in idx},
            {i: ts.stacked(i) for i in idx},
            density=density,
            scale=scale,
            merge=merge,
            implementation="pallas",
        )
        out = list(pre)
        for i in idx:
            out[i] = merged[i]
        return finish(jax.tree.unflatten(treedef, out))
    # The ranks are data (uint32), so a new density does not recompile.
    ks = np.asarray(ks, np.uint32)
    in_graph = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((pre, ts.leaves, scale)))
    if not in_graph:
        merged = [i for i, m in enumerate(mask) if m]
        device = _kth.host_device([pre[i] for i in merged] + [ts.leaves[i] for i in merged])
        if device is not None:
            out = _merge_on_host(pre, ts, scale, ks, mask=mask, scope=scope, merge=merge)
            for i in merged:  # numpy arrays in 64-byte aligned buffers: taken without a copy
                out[i] = jax.device_put(out[i], device)
        else:
            out = _merge_from_python(pre, ts, scale, ks, mask=mask, scope=scope, merge=merge)
        return finish(jax.tree.unflatten(treedef, out))
    static = {"mask": mask, "num_tasks": ts.num_tasks, "merge": merge}
    out = _ties_core(pre, ts.leaves, scale, ks, scope=scope, **static)
    return finish(jax.tree.unflatten(treedef, out))


def _merge_on_host(pre, ts, scale, ks, *, mask, scope, merge):
    """TIES on CPU arrays: thresholds found by numpy, the merge by one chunk program.

    The thresholds come from :func:`cljax.merging._kth.kth_bits` (one read of the task
    vectors on the host, exact; the counting search where its sample bracket fails). Leaves
    of at least ``_kth.SHARED`` entries are merged by :func:`_merge_chunk`, compiled once for
    every leaf shape, window by window (one zero-padded window below ``_kth.CHUNK``
    entries); smaller leaves by the same program over windows they share
    (:func:`_merge_small`). Exact cancellations are marked by a NaN; a
    non-finite output (a mark, or a NaN/Inf of the inputs) makes the rare second round
    count the majority sign over all leaves (in numpy) and merge again without marks.
    Merged leaves come back as numpy arrays.
    """
    idx = [i for i, m in enumerate(mask) if m]
    num_tasks = ts.num_tasks
    rows = {i: _kth.task_rows(ts.leaves[i], num_tasks) for i in idx}

    def threshold(leaves, k):
        bits = _kth.kth_bits([rows[i] for i in leaves], int(k))
        if bits is None:  # the sample's bracket failed: the counting search
            found = ties_threshold(
                [ts.leaves[i] for i in leaves], k, num_tasks=num_tasks, implementation="xla"
            )
            bits = np.asarray(found, np.uint32)
        return bits

    if scope == "global":
        thresholds = dict.fromkeys(idx, threshold(idx, ks[0]))
    else:
        none = np.full((num_tasks,), _KEEP_NONE, np.uint32)
        thresholds = {i: none if ks[j] == 0 else threshold([i], ks[j]) for j, i in enumerate(idx)}
    shared = min(_kth.SHARED, _kth.CHUNK)
    big = [i for i in idx if rows[i][0].size >= shared]
    small = [i for i in idx if rows[i][0].size < shared]

    def merge_all(majority, mark):
        out, finite = list(pre), True
        for i in big:
            out[i], ok = _merge_host_leaf(
                pre[i], rows[i], thresholds[i], scale, majority, mark, merge
            )
            finite &= ok
        if small:
            merged, ok = _merge_small(pre, rows, thresholds, small, scale, majority, mark, merge)
            for i, x in merged.items():
                out[i] = x
            finite &= ok
        return out, finite

    out, finite = merge_all(1.0, True)
    if finite:
        return out
    votes = sum(_votes_numpy(rows[i], thresholds[i]) for i in idx)
    return merge_all(float(np.sign(votes)), False)[0]


def _merge_host_leaf(pre, rows, bits, scale, majority, mark, merge):
    """One leaf of :func:`_merge_on_host` (a numpy array shaped like ``pre``) and whether
    it is finite."""
    base = np.asarray(pre)
    flat = base.reshape(-1)
    n = flat.size
    if n >= _kth.CHUNK:
        out, finite = _merge_windows(
            flat, rows, bits, scale, majority, mark, merge, _kth.windows(n)
        )
        return out.reshape(base.shape), finite
    # Shorter than a window: one zero-padded window (zero entries merge to θ0's zero padding).
    padded = _kth.padded_window((flat, *rows))
    out, finite = _merge_windows(padded[0], padded[1:], bits, scale, majority, mark, merge, [0])
    return out[:n].reshape(base.shape), finite


def _merge_windows(base, taus, bits, scale, majority, mark, merge, starts):
    """:func:`_merge_chunk` over the windows of flat ``base`` and ``taus`` that begin at
    ``starts`` (all dispatched before the first is read back): the merged entries in an
    aligned numpy buffer, and whether they are all finite."""
    size = _kth.CHUNK
    majority, mark = np.float32(majority), np.bool_(mark)
    parts = [
        (
            s,
            _merge_chunk(
                base[s : s + size],
                tuple(x[s : s + size] for x in taus),
                bits,
                scale,
                majority,
                mark,
                merge=merge,
            ),
        )
        for s in starts
    ]
    out, finite = _kth.aligned_empty(base.size, base.dtype), True
    for s, (value, total) in parts:
        out[s : s + size] = np.asarray(value)
        finite &= bool(np.isfinite(np.asarray(total)))
    return out, finite


@functools.partial(jax.jit, static_argnames=("merge",))
def _merge_chunk(base, slices, bits, scale, majority, mark, *, merge):
    """The merge of one window (``_kth.CHUNK`` entries) and the float32 sum of its output
    (finite unless a mark or a NaN/Inf is in it)."""
    out = disjoint_merge(base, list(slices), _thr(bits), majority, scale, merge=merge, mark=mark)
    out = lax.optimization_barrier(out)  # summed as written, not recomputed in the sum
    return out, jnp.sum(out, dtype=jnp.float32)


def _trim_numpy(rows, bits):
    """Trim on the host: entries below their task's threshold become 0 (float32 magnitudes
    compared, as :func:`cljax.kernels._ties_merge.trim`), in the rows' dtype."""
    thr = np.asarray(bits, np.uint32).view(np.float32)
    return [np.where(np.abs(np.asarray(x, np.float32)) >= thr[t], x, 0) for t, x in enumerate(rows)]


def _merge_small(pre, rows, thresholds, idx, scale, majority, mark, merge):
    """Leaves under ``_kth.SHARED`` entries merged by the chunk program: copied one after
    another into zero-padded windows (one group per pair of dtypes), each task's entries
    trimmed on the host with its leaf's threshold, so the program keeps every entry (a
    zero threshold) and leaves of different thresholds share a window. The arithmetic is
    the merge op's, entry for entry. Returns the merged leaves and whether all are finite."""
    size = _kth.CHUNK
    num_tasks = len(rows[idx[0]])
    groups: dict = {}
    for i in idx:
        key = (np.asarray(pre[i]).dtype, rows[i][0].dtype)
        groups.setdefault(key, []).append(i)
    keep_all = np.zeros((num_tasks,), np.uint32)
    out, finite = {}, True
    for (base_dtype, tau_dtype), members in groups.items():
        sizes = [rows[i][0].size for i in members]
        total = -sum(sizes) // size * -size
        base = np.zeros(total, base_dtype)
        taus = [np.zeros(total, tau_dtype) for _ in range(num_tasks)]
        at = 0
        for i, n in zip(members, sizes, strict=True):
            base[at : at + n] = np.asarray(pre[i]).reshape(-1)
            for t, x in enumerate(_trim_numpy(rows[i], thresholds[i])):
                taus[t][at : at + n] = x
            at += n
        merged, ok = _merge_windows(
            base, taus, keep_all, scale, majority, mark, merge, range(0, total, size)
        )
        finite &= ok
        at = 0
        for i, n in zip(members, sizes, strict=True):
            out[i] = merged[at : at + n].reshape(np.shape(pre[i]))
            at += n
    return out, finite


def _sum_numpy(kept):
    total = kept[0].astype(np.float64 if kept[0].dtype == np.float64 else np.float32)
    for v in kept[1:]:
        total = total + v.astype(total.dtype)
    return total


def _votes_numpy(rows, bits):
    """Σ sign(Σ_t τ̂_t) over one leaf's entries, block by block (the rare second round)."""
    votes = 0
    n = rows[0].size
    for s in range(0, n, _kth.CHUNK):
        total = _sum_numpy(_trim_numpy([r[s : s + _kth.CHUNK] for r in rows], bits))
        votes += int(np.count_nonzero(total > 0)) - int(np.count_nonzero(total < 0))
    return votes


def _merge_from_python(pre, ts, scale, ks, *, mask, scope, merge):
    """TIES on concrete inputs, leaf by leaf: programs compiled once per leaf shape.

    Inside one computation (:func:`_ties_core`, used under a trace) XLA compiles every
    leaf's search and merge separately. Here the thresholds come from the threshold op's
    XLA search run from Python (over all leaves for the global scope, leaf by leaf for the
    per-leaf scope): its reads of the leaves are programs compiled once per leaf shape, its
    bookkeeping runs on the host. Each leaf is then merged by a program compiled once per
    shape, with exact cancellations marked by a NaN. A non-finite partial sum of any merged
    leaf (a mark, or a NaN/Inf of the inputs) makes the rare second round count the majority
    sign over all leaves and merge again without marks, as :func:`_ties_core` does.
    """
    idx = [i for i, m in enumerate(mask) if m]
    num_tasks = ts.num_tasks
    if scope == "global":
        leaves = [ts.leaves[i] for i in idx]
        thr = ties_threshold(leaves, ks[0], num_tasks=num_tasks, implementation="xla")
        thresholds = dict.fromkeys(idx, thr)
    else:
        thresholds = _eager_leaf_thresholds(ts, idx, ks)
    static = {"num_tasks": num_tasks, "merge": merge}
    out = list(pre)
    sums = []
    one, mark = jnp.float32(1.0), jnp.bool_(True)  # made once: an eager op each
    for i in idx:
        out[i], total = _merge_leaf(pre[i], ts.leaves[i], thresholds[i], scale, one, mark, **static)
        sums.append(total)
    if bool(_all_finite(tuple(sums))):  # one transfer to the host, not one a leaf
        return out
    votes = _add_votes(
        tuple(_leaf_votes(ts.leaves[i], thresholds[i], num_tasks=num_tasks) for i in idx)
    )
    majority = jnp.sign(votes).astype(jnp.float32)
    no_mark = jnp.bool_(False)
    for i in idx:
        out[i], _ = _merge_leaf(
            pre[i], ts.leaves[i], thresholds[i], scale, majority, no_mark, **static
        )
    return out


@jax.jit
def _all_finite(sums):
    return jnp.all(jnp.isfinite(jnp.stack(sums)))


@functools.partial(jax.jit, static_argnames=("num_tasks", "merge"))
def _merge_leaf(p, leaf, threshold, scale, majority, mark, *, num_tasks, merge):
    """One leaf of :func:`_disjoint_merge` and the float32 sum of its output (finite unless
    a mark or a NaN/Inf is in it)."""
    static = {"mask": (True,), "num_tasks": num_tasks, "merge": merge}
    out = _disjoint_merge([p], [leaf], {0: threshold}, scale, majority, mark, **static)[0]
    out = lax.optimization_barrier(out)  # summed as written, not recomputed in the sum
    return out, jnp.sum(out, dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def _leaf_votes(leaf, threshold, *, num_tasks):
    """Σ sign(Σ_t τ̂_t) over one leaf's entries (int32), for the majority sign."""
    return sign_votes(_common.TaskSet([leaf], num_tasks).slices(0), _thr(threshold))


@jax.jit
def _add_votes(votes):
    return functools.reduce(jnp.add, votes)


def _thr(bits):
    return lax.bitcast_convert_type(bits, jnp.float32)


def _disjoint_merge(pre, leaves, thresholds, scale, majority, mark, *, mask, num_tasks, merge):
    """2-3. Elect and merge every merged leaf, one read of the task vectors (the merge op
    :func:`cljax.kernels._ties_merge.disjoint_merge`). Coordinates whose trimmed values cancel
    exactly (sum 0, some value not 0) take the ``majority`` sign, or with ``mark`` a NaN
    instead."""
    out = list(pre)
    # Slices are taken inside each computation from the leaves as given: a slice handed to
    # another computation (a loop) is written out, all T·P values of it.
    leaves = _common.TaskSet(leaves, num_tasks)
    for i, m in enumerate(mask):
        if m:
            out[i] = disjoint_merge(
                pre[i],
                leaves.slices(i),
                _thr(thresholds[i]),
                majority,
                scale,
                merge=merge,
                mark=mark,
            )
    return out


def _majority_sign(leaves, thresholds, *, mask, num_tasks):
    """sign(Σ_p γ_p) over all merged entries, by plain reductions: slow on XLA:CPU but quick
    to compile, and this runs only where the marked merge found a tie."""
    # A fresh reference to the leaves: slices shared with the merge are written out.
    leaves = _common.TaskSet(lax.optimization_barrier(leaves), num_tasks)
    sums = [
        lax.optimization_barrier(_common.sum_slices(trim(leaves.slices(i), _thr(thresholds[i]))))
        for i, m in enumerate(mask)
        if m
    ]
    sums = jnp.concatenate([x.reshape(-1) for x in sums])
    positive = jnp.sum(sums > 0, dtype=jnp.int32)
    negative = jnp.sum(sums < 0, dtype=jnp.int32)
    return jnp.sign(positive - negative).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("mask", "num_tasks", "merge"))
def _second_round(pre, tv_leaves, scale, thresholds, *, mask, num_tasks, merge):
    """The merge without marks: ties take the majority sign (counted first)."""
    static = {"mask": mask, "num_tasks": num_tasks}
    majority = _majority_sign(tv_leaves, thresholds, **static)
    return _disjoint_merge(
        pre, tv_leaves, thresholds, scale, majority, False, merge=merge, **static
    )


def _eager_leaf_thresholds(ts, idx, ks):
    """Per-leaf thresholds (bits) of the merged leaves ``idx``, computed outside a trace.

    Inside ``_ties_core`` every leaf carries its own search, compiled separately (a ViT-B/32
    holds 152 leaves of 10 shapes). Here each leaf's search runs from Python (the threshold
    op's XLA search on concrete arrays): the leaves of one shape share its three compiled
    reads, the bookkeeping runs on the host. A leaf whose keep count is 0 keeps nothing.
    """
    num_tasks = ts.num_tasks
    none = jnp.asarray(np.full((num_tasks,), _KEEP_NONE, np.uint32))
    return {
        i: none
        if ks[j] == 0
        else ties_threshold([ts.leaves[i]], ks[j], num_tasks=num_tasks, implementation="xla")
        for j, i in enumerate(idx)
    }


# A NaN pattern: |x| >= NaN is false for every x, so a leaf whose keep count is 0 keeps nothing.
_KEEP_NONE = 0x7FC00000


@functools.partial(jax.jit, static_argnames=("num_tasks",))
def _leaf_threshold(leaf, k, *, num_tasks):
    """The k-th largest magnitude (bits) of one leaf, per task; for k = 0 a threshold no
    entry reaches."""
    rank = jnp.maximum(k, 1)
    bits = ties_threshold([leaf], rank, num_tasks=num_tasks, implementation="xla")
    return jnp.where(k == 0, jnp.uint32(_KEEP_NONE), bits)


@functools.partial(jax.jit, static_argnames=("mask", "num_tasks", "scope", "merge"))
def _ties_core(pre, tv_leaves, scale, ks, *, mask, num_tasks, scope, merge):
    """TIES inside one computation (under a trace): thresholds, the marked merge, and the
    second round in a while loop run 0 or 1 times.

    Exact cancellations are rare: merge once with them marked by a NaN. A plain sum of the
    output (a fast reduction) is finite only where no entry is NaN (or Inf): then the result
    stands. Otherwise (a tie, a NaN/Inf in the inputs, an overflowing sum) the second round
    counts the majority and merges again without marks: an input can cost that second
    merge, never a wrong value.
    """
    idx = [i for i, m in enumerate(mask) if m]
    static = {"mask": mask, "num_tasks": num_tasks}

    # 1. Trim: per-task thresholds, the k-th largest magnitude (exact: the threshold op's XLA search).
    if scope == "global":
        leaves = [tv_leaves[i] for i in idx]
        thr = ties_threshold(leaves, ks[0], num_tasks=num_tasks, implementation="xla")
        thresholds = dict.fromkeys(idx, thr)
    else:
        thresholds = {
            i: _leaf_threshold(tv_leaves[i], ks[j], num_tasks=num_tasks) for j, i in enumerate(idx)
        }

    one = jnp.float32(1.0)
    out = _disjoint_merge(pre, tv_leaves, thresholds, scale, one, True, merge=merge, **static)
    out = lax.optimization_barrier(out)  # summed as written, not recomputed in the sums
    finite = jnp.isfinite(sum(jnp.sum(out[i], dtype=jnp.float32) for i in idx))

    def again(state):
        del state
        merged = _second_round(pre, tv_leaves, scale, thresholds, merge=merge, **static)
        return merged, jnp.bool_(True)

    return lax.while_loop(lambda state: ~state[1], again, (out, finite))[0]
