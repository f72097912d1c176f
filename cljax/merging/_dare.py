"""DARE: drop and rescale task-vector entries (Yu et al., 2024)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cljax import tree as ct
from cljax.merging import _common, _kth

__all__ = ["dare"]


def dare(
    task_vectors: Sequence[ct.Params] | ct.Params,
    *,
    drop_rate: float,
    key: jax.Array | int,
    rescale: bool = True,
    rules: ct.Rules | None = None,
    check_finite: bool = False,
):
    """Drops each task-vector entry with probability p and rescales the rest by 1/(1−p).

    DARE is a pre-processing step: merge its output with :func:`task_arithmetic`,
    :func:`ties` or :func:`average`. Masks are independent per task and per leaf: the key of
    task ``t`` and leaf ``path`` is ``fold_in(fold_in(key, t), crc32(path))``, so a merge is
    reproducible and does not depend on the order in which leaves are visited. An entry is
    dropped when its 32 random bits fall below ``round(p·2³²)`` (p quantised to 2⁻³²). The
    bits are a keyed hash of the entry's flat index (:func:`entry_bits`), two key words
    drawn from that key: an elementwise computation that fuses into the drop, where
    ``jax.random.bits`` for every entry is materialised on XLA:CPU (a temporary array of
    random words per entry, read back by a separate pass).
    Kept entries are multiplied by ``1/(1−p)`` in float32, then cast back to the storage
    dtype: for p near 1 the factor is large. DARE fails when deltas are large (continued
    pre-training, large learning rates), as its authors note.

    Args:
      task_vectors: T task vectors, a list of trees or one stacked tree (leading axis T).
      drop_rate: p in [0, 1).
      key: a JAX PRNG key (``jax.random.key`` or ``PRNGKey``) or an int seed.
      rescale: multiply kept entries by 1/(1−p) (DARE). ``False`` gives "DropOnly".
      rules: optional path rules ``[(regex, bool), ...]``; excluded and integer leaves pass
        through unchanged (e.g. ``[(".*classifier.*", False)]`` as MergeLM does for heads).
      check_finite: raise a ``ValueError`` if an input or the result holds NaN/Inf (needs
        concrete arrays: not under jit).

    Returns:
      The processed task vectors as one stacked tree (leading axis T), dtypes preserved.

    Raises:
      ValueError: for ``drop_rate`` outside [0, 1) or not a real scalar (``True``, NaN),
        an empty list, mismatched trees, or with ``check_finite`` on NaN/Inf.

    Example:
      >>> sparse = dare([tau_a, tau_b], drop_rate=0.9, key=jax.random.key(0))
      >>> merged = task_arithmetic(theta0, sparse, scale=0.3)

    References:
      Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
      Models as a Free Lunch", ICML 2024.
    """
    _common.check_scalar(
        drop_rate, name="drop_rate", where="dare", low=0.0, high=1.0, high_open=True
    )
    if isinstance(key, int):
        key = jax.random.key(key)
    reference = _common.reference_of(task_vectors)
    ts = _common.read_task_set(task_vectors, reference, ref_name="task_vectors[0]")
    if check_finite:
        _common.check_finite_trees("dare", task_vectors=task_vectors)
    mask = tuple(_common.participating(reference, rules))
    hashes = tuple(_common.path_hash(p) for p in ct.paths(reference))
    treedef = jax.tree.structure(reference)
    # The cutoff and the factor are data: a new drop rate reuses the compiled merge.
    cutoff = np.uint32(min(round(float(drop_rate) * 2.0**32), 2**32 - 1))
    factor = np.float64(1.0 / (1.0 - float(drop_rate)) if rescale else 1.0)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((ts.leaves, key)))
    static = {"mask": mask, "hashes": hashes, "num_tasks": ts.num_tasks}
    device = None if traced else _kth.host_device(ts.leaves)
    if traced:
        out = _dare_core(ts.leaves, key, cutoff, factor, **static)
    elif device is not None:
        out = _dare_on_host(ts, key, cutoff, factor, device=device, **static)
    else:
        out = _dare_from_python(ts, key, cutoff, factor, **static)
    out = jax.tree.unflatten(treedef, out)
    if check_finite:
        _common.check_finite_trees("dare", result=out)
    return out


@functools.partial(jax.jit, static_argnames=("mask", "hashes", "num_tasks"))
def _dare_core(tv_leaves, key, cutoff, factor, *, mask, hashes, num_tasks):
    """DARE inside one computation (under a trace): code for every leaf."""
    ts = _common.TaskSet(tv_leaves, num_tasks)
    merged = [i for i, m in enumerate(mask) if m]
    out = [ts.stacked(i) for i in range(len(mask))]
    if not merged:
        return out
    words = _key_words(key, jnp.asarray([hashes[i] for i in merged], jnp.uint32), num_tasks)
    for j, i in enumerate(merged):
        out[i] = _drop(out[i], words[j], cutoff, factor)
    return out


def _dare_from_python(ts, key, cutoff, factor, *, mask, hashes, num_tasks):
    """DARE on concrete inputs: one program draws every mask's key words, and each leaf is
    processed by a program compiled once per leaf shape (the same values as
    :func:`_dare_core`, far less to compile for models that repeat a few shapes)."""
    merged = [i for i, m in enumerate(mask) if m]
    out = [ts.stacked(i) for i in range(len(mask))]
    if not merged:
        return out
    folds = jnp.asarray([hashes[i] for i in merged], jnp.uint32)
    words = _key_words_jit(key, folds, num_tasks=num_tasks)
    for j, i in enumerate(merged):
        out[i] = _drop_leaf(out[i], words, np.int32(j), cutoff, factor)
    return out


def _dare_on_host(ts, key, cutoff, factor, *, device, mask, hashes, num_tasks):
    """DARE on CPU arrays (the same values as :func:`_dare_core`), with two programs
    whatever the model's shapes.

    Rows of at least ``_kth.SHARED`` entries are read in windows of ``_kth.CHUNK`` entries
    (the last one ending at the row's end, overlapping the one before; a shorter row
    zero-padded), all T rows of a window in one call of :func:`_drop_window`; shorter rows,
    of every leaf and task, are copied one after another into shared windows with each
    entry's flat index and key words beside it (:func:`_drop_packed`). The results are
    written into host buffers that JAX takes without a copy.
    """
    merged = [i for i, m in enumerate(mask) if m]
    shapes = [np.shape(x[0]) if isinstance(x, tuple) else x.shape[1:] for x in ts.leaves]
    out: list = [
        jax.device_put(np.stack(_kth.task_rows(x, num_tasks)).reshape(-1, *shapes[i]), device)
        if isinstance(x, tuple) and not mask[i]
        else x
        for i, x in enumerate(ts.leaves)
    ]
    if not merged:
        return out
    folds = jnp.asarray([hashes[i] for i in merged], jnp.uint32)
    words = np.asarray(_key_words_quick(key, folds, num_tasks=num_tasks))
    cutoff, factor = jax.device_put((cutoff, factor), device)  # converted once, not per call
    size = _kth.CHUNK
    results, small = {}, []
    for j, i in enumerate(merged):
        rows = _kth.task_rows(ts.leaves[i], num_tasks)
        n = rows[0].size
        result = _kth.aligned_empty(num_tasks * n, rows[0].dtype).reshape(num_tasks, n)
        results[i] = result
        if n < min(_kth.SHARED, size):
            small.append((j, i, rows))
            continue
        if n < size:  # one zero-padded window
            rows, starts = _kth.padded_window(rows), [0]
        else:
            starts = _kth.windows(n)
        parts = [
            (
                s,
                _drop_window(
                    tuple(x[s : s + size] for x in rows), words[j], np.uint32(s), cutoff, factor
                ),
            )
            for s in starts
        ]
        for s, value in parts:
            part = np.asarray(value)
            if n < size:
                result[...] = part[:, :n]
            else:
                result[:, s : s + size] = part
    if small:
        _drop_small(small, results, words, cutoff, factor)
    for i, result in results.items():
        out[i] = jax.device_put(result.reshape(-1, *shapes[i]), device)
    return out


def _drop_small(small, results, words, cutoff, factor):
    """The rows under ``_kth.SHARED`` entries, ``[(j, i, rows)]``, dropped through shared
    windows of :func:`_drop_packed` (one group per dtype) into ``results[i]``."""
    size = _kth.CHUNK
    groups: dict = {}
    for item in small:
        groups.setdefault(item[2][0].dtype, []).append(item)
    for dtype, members in groups.items():
        total = sum(len(rows) * rows[0].size for _, _, rows in members)
        total = -total // size * -size
        x = np.zeros(total, dtype)
        idx = np.zeros(total, np.uint32)
        w0 = np.zeros(total, np.uint32)
        w1 = np.zeros(total, np.uint32)
        at = 0
        for j, _, rows in members:
            n = rows[0].size
            for t, row in enumerate(rows):
                x[at : at + n] = row
                idx[at : at + n] = np.arange(n, dtype=np.uint32)
                w0[at : at + n] = words[j, t, 0]
                w1[at : at + n] = words[j, t, 1]
                at += n
        parts = [
            _drop_packed(*(a[s : s + size] for a in (x, idx, w0, w1)), cutoff, factor)
            for s in range(0, total, size)
        ]
        flat = np.concatenate([np.asarray(p) for p in parts])
        at = 0
        for _, i, rows in members:
            n = rows[0].size
            results[i][...] = flat[at : at + len(rows) * n].reshape(len(rows), n)
            at += len(rows) * n


@jax.jit
def _drop_window(rows, words, start, cutoff, factor):
    """:func:`_drop` of the window of T rows that starts at entry ``start`` of each row:
    ``(T, _kth.CHUNK)``."""
    idx = start + lax.iota(jnp.uint32, rows[0].shape[0])
    return jnp.stack(
        [
            _drop_entries(x, idx, words[t, 0], words[t, 1], cutoff, factor)
            for t, x in enumerate(rows)
        ]
    )


@jax.jit
def _drop_packed(x, idx, w0, w1, cutoff, factor):
    """:func:`_drop` of entries whose flat index and key words are given entry by entry."""
    return _drop_entries(x, idx, w0, w1, cutoff, factor)


def _drop_entries(x, idx, w0, w1, cutoff, factor):
    return _keep_scaled(x, _index_bits(idx, w0, w1), cutoff, factor)


def _key_words(key, folds, num_tasks):
    """``(leaves, T, 2)`` uint32: the key words of every (leaf, task) mask, drawn from
    ``fold_in(fold_in(key, t), hash)`` in one vectorised PRNG computation."""
    tasks = jnp.arange(num_tasks, dtype=jnp.uint32)

    def task_words(h):  # (T, 2)
        return jax.vmap(
            lambda t: jax.random.bits(
                jax.random.fold_in(jax.random.fold_in(key, t), h), (2,), jnp.uint32
            )
        )(tasks)

    return jax.vmap(task_words)(folds)


_key_words_jit = jax.jit(_key_words, static_argnames=("num_tasks",))
# The same words from code LLVM optimises less: the unrolled hash rounds of a few thousand
# words compile several times faster, and integer arithmetic gives the same bits.
_key_words_quick = jax.jit(
    _key_words,
    static_argnames=("num_tasks",),
    compiler_options={"xla_backend_optimization_level": 1},
)


def _drop(x, words, cutoff, factor):
    """Drops the entries of a stacked leaf ``(T, ...)`` whose bits fall below ``cutoff``
    and scales the rest by ``factor`` (float32 arithmetic, stored in ``x``'s dtype)."""
    return _keep_scaled(x, entry_bits(x.shape, words, batch_dims=1), cutoff, factor)


def _keep_scaled(x, bits, cutoff, factor):
    """``x``'s entries whose ``bits`` reach ``cutoff``, times ``factor`` (in float32 or
    wider), the others zero; stored in ``x``'s dtype."""
    v = _common.accum(x)
    v = v * factor.astype(v.dtype)
    return jnp.where(bits >= cutoff, v, 0).astype(x.dtype)


@jax.jit
def _drop_leaf(x, words, j, cutoff, factor):
    return _drop(x, words[j], cutoff, factor)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with
    probability near 1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def entry_bits(shape: Sequence[int], words: jax.Array, *, batch_dims: int = 0) -> jax.Array:
    """32 pseudo-random bits per entry of an array of ``shape``, keyed per batch entry.

    The bits of the entry at flat index ``i`` (row-major over the non-batch axes) are
    ``fmix32(fmix32(i·φ + w0) ^ w1)``, ``φ = 0x9E3779B9``: a Weyl sequence mixed twice
    (SplitMix-style), counter-based, so elementwise and free of temporaries. The flat
    index comes from per-axis iotas (no reshape: a sharded array keeps its sharding).

    Args:
      shape: the array's shape, batch axes first.
      words: ``(*shape[:batch_dims], 2)`` uint32 key words (e.g. two words of
        ``jax.random.bits``).
      batch_dims: leading axes whose entries each take their own key words.

    Returns:
      ``shape`` uint32 bits.

    Raises:
      ValueError: for 2³² or more entries per batch entry (their indices would repeat).
    """
    shape = tuple(shape)
    if math.prod(shape[batch_dims:]) >= 1 << 32:
        raise ValueError(
            f"entry_bits: {shape=} holds 2**32 or more entries per batch entry; the flat "
            "index is uint32"
        )
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(batch_dims, len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    expand = (slice(None),) * batch_dims + (None,) * (len(shape) - batch_dims)
    w0, w1 = words[..., 0][expand], words[..., 1][expand]
    return _index_bits(idx, w0, w1)


def _index_bits(idx, w0, w1):
    """The bits of the entries at flat indices ``idx`` under key words ``w0, w1``
    (:func:`entry_bits`'s formula)."""
    return _fmix32(_fmix32(idx * jnp.uint32(0x9E3779B9) + w0) ^ w1)
