"""GPM: Gradient Projection Memory (Saha, Garg & Roy, ICLR 2021).

After each task, GPM stores for every protected layer an orthonormal basis ``M`` of the
input-activation subspace that the task used; later updates of the layer's kernel are
projected onto the orthogonal complement of ``M`` on the **input side**. Inputs inside
``span(M)`` then produce the same outputs whatever is learned next.

Layout: a Flax kernel is ``[in, out]`` (dense) or ``[kh, kw, in, out]`` (conv), so the input
side is a **left** multiplication of the update reshaped to ``[d, out]`` with
``d = prod(shape[:-1])``: ``U <- U - M (M^T U)`` (Saha et al., ICLR 2021; github.com/sahagobinda/GPM). Conv representations are
im2col patches flattened in the same ``(kh, kw, in)`` order (:func:`record_layer_inputs`).

The projection is an optax transform applied to the **final update**, i.e. after Adam, so it
holds exactly whatever optimiser runs before it; GPM itself uses plain SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cljax import tree as ct
from cljax.projection._common import check_finite_inputs, select_targets

__all__ = [
    "GPMState",
    "conv_patches",
    "gpm",
    "gpm_representations",
    "gpm_next_task",
    "record_layer_inputs",
]


class GPMState(NamedTuple):
    """State of :func:`gpm`.

    Attributes:
      memory: per target (in target order), ``[d, d]`` float32; the first ``rank`` columns
        are the orthonormal basis of the protected input subspace, the rest are zero (a
        fixed shape keeps one compiled step and one checkpoint layout for all tasks).
      rank: per target, int32 number of basis vectors stored.
      task: int32, number of memory updates done (completed tasks).
    """

    memory: tuple[jax.Array, ...]
    rank: tuple[jax.Array, ...]
    task: jax.Array


def _freeze_mask(params: Any, freeze_1d: bool | ct.Rules) -> list[bool]:
    leaves = ct.leaves_with_paths(params)
    if freeze_1d is True:
        return [jnp.ndim(x) == 1 for _, x in leaves]
    if freeze_1d is False or freeze_1d is None:
        return [False] * len(leaves)
    sel = ct.leaves_with_paths(ct.rule_mask(params, list(freeze_1d), default=False))
    return [bool(s) and jnp.ndim(x) == 1 for (_, x), (_, s) in zip(leaves, sel, strict=True)]


def gpm(
    targets: ct.Rules,
    *,
    freeze_1d: bool | ct.Rules = False,
) -> optax.GradientTransformationExtraArgs:
    """Projects the updates of protected kernels orthogonally to their GPM memory.

    Put it last in the chain, after the optimiser: ``optax.chain(optax.adam(lr), gpm(...))``.
    The memory grows between tasks through :func:`gpm_next_task` (a pure hook on the
    :class:`GPMState`, reached inside a chain with :func:`cljax.projection.map_state`).

    Args:
      targets: ``(regex, bool)`` path rules selecting the protected kernels (2-D dense
        ``[in, out]`` or 4-D conv ``[kh, kw, in, out]``); first match wins, default False.
        Task-specific heads are usually excluded.
      freeze_1d: zero the updates of 1-D parameters once the first task is done (GPM freezes
        BatchNorm affine parameters; here also biases, which would otherwise move the
        outputs of protected inputs). ``True`` freezes every 1-D leaf; rules freeze the 1-D
        leaves they select.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`GPMState`.

    Raises:
      ValueError: (at ``init``) if the rules select nothing or a target is not 2-D/4-D.

    Example::

      tx = optax.chain(optax.adam(1e-3), gpm([(r"Dense_\\d/kernel", True)], freeze_1d=True))
      state = tx.init(params)
      ...  # train task 0
      reps = gpm_representations(params, targets, record_layer_inputs(model, variables, x))
      opt_state = map_state(opt_state, GPMState, lambda s: gpm_next_task(s, reps, threshold=0.97))

    References:
      Saha, Garg & Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021.
    """
    targets = list(targets)

    def init_fn(params):
        paths = select_targets(params, targets, method="gpm", allowed_ndim=(2, 4))
        by_path = dict(ct.leaves_with_paths(params))
        mem, rank = [], []
        for p in paths:
            d = int(np.prod(jnp.shape(by_path[p])[:-1]))
            mem.append(jnp.zeros((d, d), jnp.float32))
            rank.append(jnp.zeros((), jnp.int32))
        return GPMState(tuple(mem), tuple(rank), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        paths = select_targets(updates, targets, method="gpm", allowed_ndim=(2, 4))
        index = {p: i for i, p in enumerate(paths)}
        frozen = _freeze_mask(updates, freeze_1d)
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        out = []
        for (kp, u), freeze in zip(flat, frozen, strict=True):
            p = ct.path_str(kp)
            if p in index:
                m = state.memory[index[p]]
                u2 = u.reshape(-1, u.shape[-1]).astype(m.dtype)
                u2 = u2 - m @ (m.T @ u2)
                u = u2.reshape(u.shape).astype(u.dtype)
            elif freeze:
                u = jnp.where(state.task > 0, jnp.zeros_like(u), u)
            out.append(u)
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_threshold(threshold: float | Sequence[float], n: int) -> list[float]:
    one = np.ndim(threshold) == 0
    ts: list[Any] = [threshold] * n if one else list(cast(Sequence[float], threshold))
    if len(ts) != n:
        raise ValueError(f"gpm_next_task: got {len(ts)} thresholds for {n} targets")
    for t in ts:
        if not 0.0 < float(t) <= 1.0:
            raise ValueError(f"gpm_next_task: threshold={float(t)} must be in (0, 1]")
    return [float(t) for t in ts]


# A direction holding less than this fraction of a representation's energy is float32 SVD
# noise (~1e-14 of it for data of lower rank than its width).
_NOISE_ENERGY = 1e-10


def _grow(
    memory: jax.Array, rank: jax.Array, x: jax.Array, threshold: float, first: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One layer's memory update from representation rows ``x`` [n, d]."""
    d = memory.shape[0]
    x = x.astype(memory.dtype)
    total = jnp.sum(x * x)
    xh = x - (x @ memory) @ memory.T
    _, s, vt = jnp.linalg.svd(xh, full_matrices=False)
    safe_total = jnp.where(total > 0, total, 1.0)
    ratio = s**2 / safe_total
    # First task (empty memory): r = #{i : cumsum_i(s^2)/sum(s^2) < eps}, strict "<".
    r_first = jnp.sum(jnp.cumsum(s**2) / jnp.maximum(jnp.sum(s**2), 1e-30) < threshold)
    # Later tasks: start from the energy the memory already captures, relative to the
    # energy of the *original* representation, and add sigma_hat_i^2/||R||^2 while < eps.
    captured = (total - jnp.sum(xh * xh)) / safe_total
    before = captured + jnp.cumsum(ratio) - ratio
    r_later = jnp.sum(before < threshold)
    if threshold >= 1.0:
        # eps = 1 asks for every direction of the data. The strict counts above would hinge
        # on rounding: the running energy reaches 1 only up to the noise directions' ~1e-14.
        r = jnp.sum(ratio > _NOISE_ENERGY)
    else:
        r = jnp.where(first, r_first, r_later)
    # Directions with (numerically) zero energy are not in the data: never store them.
    r = jnp.minimum(r, jnp.sum(s > s[0] * 1e-6))
    r = jnp.where(total > 0, r, 0)
    r = jnp.minimum(r, d - rank).astype(jnp.int32)
    k = vt.shape[0]
    new = vt.T * (jnp.arange(k) < r)  # [d, k], first r columns kept
    new = new - memory @ (memory.T @ new)  # one re-orthogonalisation pass against M
    if k < d:
        new = jnp.pad(new, ((0, 0), (0, d - k)))
    new = new[:, :d]
    return memory + jnp.roll(new, rank, axis=1), rank + r


def gpm_next_task(
    state: GPMState,
    representations: Sequence[jax.typing.ArrayLike],
    *,
    threshold: float | Sequence[float],
) -> GPMState:
    """Between-task hook: grows each target's memory from the task's representations.

    For each target with representation rows ``X`` (``[n, d]``, one input vector a row:
    a sample for dense layers, a patch for convs, a token for transformers):

    * first task: SVD ``X = U S V^T``; keep the first ``r`` right singular vectors with
      ``r = #{i : sum_{j<=i} s_j^2 / sum s^2 < eps}`` (strict, as the reference);
    * later tasks: ``X_hat = X - X M M^T``; SVD of ``X_hat``; starting from the captured
      fraction ``(||X||^2 - ||X_hat||^2)/||X||^2`` add ``s_hat_i^2/||X||^2`` one by one
      while the running total is ``< eps``; append those vectors to ``M``.

    ``eps = 1`` keeps every direction holding more than 1e-10 of the energy (the strict
    counts, the reference's, would depend on how a running sum that reaches 1 rounds).
    ``r`` is capped so that ``M`` never exceeds ``d`` columns; zero-energy directions are
    never stored. GPM writes ``R`` as ``[d, n]`` and keeps left singular vectors; the rows
    here are its columns, so these are the same vectors.

    Args:
      state: the :class:`GPMState` to update.
      representations: per target in target order (see :func:`gpm_representations`),
        ``[n, d]`` arrays.
      threshold: energy threshold ``eps`` in (0, 1], one for all targets or one per target
        (the PMNIST reference uses ``[0.95, 0.99, 0.99]``).

    Returns:
      The updated state, with ``task`` incremented.

    Raises:
      ValueError: on thresholds outside (0, 1], a count or shape mismatch, or a
        representation holding NaN or Inf.

    References:
      Saha, Garg & Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021
      (and ``sahagobinda/GPM``, ``main_pmnist.py``).
    """
    reps = list(representations)
    if len(reps) != len(state.memory):
        raise ValueError(
            f"gpm_next_task: got {len(reps)} representations for {len(state.memory)} targets"
        )
    ts = _check_threshold(threshold, len(reps))
    for i, (x, m) in enumerate(zip(reps, state.memory, strict=True)):
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != m.shape[0]:
            raise ValueError(
                f"gpm_next_task: representation {i} has shape {jnp.shape(x)}; "
                f"expected [n, {m.shape[0]}]"
            )
    check_finite_inputs(reps, where="gpm_next_task", what="representation")
    first = state.task == 0
    mem, rank = [], []
    for x, m, k, t in zip(reps, state.memory, state.rank, ts, strict=True):
        m2, k2 = _grow_jit(m, k, jnp.asarray(x), t, first)
        mem.append(m2)
        rank.append(k2)
    return GPMState(tuple(mem), tuple(rank), state.task + 1)


_grow_jit = jax.jit(_grow, static_argnums=(3,))


# ----------------------------------------------------------------------------- recording


def _conv_dims(nd: int) -> tuple[str, str, str]:
    sp = {1: "W", 2: "HW", 3: "DHW"}.get(nd)
    if sp is None:
        raise ValueError(f"conv_patches: {nd}-D convolutions are not supported (1-3)")
    return f"N{sp}C", f"{sp}IO", f"N{sp}C"


def _canon_padding(padding: Any, nd: int) -> Any:
    if isinstance(padding, str):
        if padding.upper() in ("SAME", "VALID"):
            return padding.upper()
        raise ValueError(f"conv_patches: {padding=} is not supported (SAME, VALID, ints, pairs)")
    if isinstance(padding, int):
        return [(padding, padding)] * nd
    pads = []
    for p in padding:
        pads.append((p, p) if isinstance(p, int) else tuple(p))
    if len(pads) != nd:
        raise ValueError(f"conv_patches: {padding=} does not have {nd} spatial entries")
    return pads


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * nd
    if isinstance(v, int):
        return (v,) * nd
    return tuple(v)


def conv_patches(
    x: jax.Array,
    kernel_size: Sequence[int],
    *,
    strides: int | Sequence[int] | None = 1,
    padding: Any = "SAME",
    kernel_dilation: int | Sequence[int] | None = 1,
) -> jax.Array:
    """im2col patches of a channels-last input, flattened like a Flax conv kernel.

    Each row is the receptive field of one output position, flattened in ``(*kernel_size,
    in)`` order: the order of ``kernel.reshape(-1, out)`` for a Flax kernel
    ``[*kernel_size, in, out]``. Hence ``conv_patches(x, ...) @ kernel.reshape(-1, out)``
    equals the convolution (flattened over batch and positions).

    Args:
      x: ``[N, *spatial, C]`` input.
      kernel_size: spatial kernel shape.
      strides: window strides.
      padding: ``"SAME"``, ``"VALID"``, an int or per-dimension ints / ``(lo, hi)`` pairs.
      kernel_dilation: kernel (atrous) dilation.

    Returns:
      ``[N * prod(out_spatial), prod(kernel_size) * C]``.

    Raises:
      ValueError: for unsupported paddings or ranks.

    References:
      Saha et al., GPM, ICLR 2021 (representation matrices of convolutional layers).
    """
    nd = len(kernel_size)
    lhs, rhs, out = _conv_dims(nd)
    c = x.shape[-1]
    p = jax.lax.conv_general_dilated_patches(
        x,
        filter_shape=tuple(kernel_size),
        window_strides=_tuple(strides, nd),
        padding=_canon_padding(padding, nd),
        rhs_dilation=_tuple(kernel_dilation, nd),
        dimension_numbers=(lhs, rhs, out),
    )
    # The patch features come channel-major (C, *kernel); reorder to (*kernel, C).
    p = p.reshape(*p.shape[:-1], c, int(np.prod(kernel_size)))
    p = jnp.swapaxes(p, -1, -2)
    return p.reshape(-1, int(np.prod(kernel_size)) * c)


def _layer_rows(mod: Any, inp: jax.Array, key: str, is_conv: bool) -> jax.Array:
    """One layer's input as representation rows (dense: tokens, conv: im2col patches)."""
    inp = jnp.asarray(inp)
    if not is_conv:
        return inp.reshape(-1, inp.shape[-1])
    ks = tuple(mod.kernel_size) if not isinstance(mod.kernel_size, int) else (mod.kernel_size,)
    if mod.feature_group_count != 1 or any(v != 1 for v in _tuple(mod.input_dilation, len(ks))):
        raise ValueError(
            f"record_layer_inputs: {key}: grouped or input-dilated convs are not supported"
        )
    if inp.ndim == len(ks) + 1:  # unbatched
        inp = inp[None]
    return conv_patches(
        inp, ks, strides=mod.strides, padding=mod.padding, kernel_dilation=mod.kernel_dilation
    )


def record_layer_inputs(
    module: nn.Module | nnx.Module,
    *args: Any,
    layer_types: tuple[type, ...] | None = None,
    **kwargs: Any,
) -> dict[str, jax.Array]:
    """Runs a model once and records the input of every dense and conv layer.

    Two calling forms, one result:

    * linen: ``record_layer_inputs(module, variables, *inputs)`` runs
      ``module.apply(variables, *inputs, **kwargs)`` under
      :func:`flax.linen.intercept_methods`; default layers ``nn.Dense`` and ``nn.Conv``.
    * NNX: ``record_layer_inputs(model, *inputs)`` calls ``model(*inputs, **kwargs)`` on
      the live ``nnx.Module``; default layers ``nnx.Linear`` and ``nnx.Conv``. Their
      ``__call__`` is wrapped for the duration of the call (as :func:`flax.nnx.capture`
      does), so do not run the same layer classes in another thread meanwhile. Under
      ``jax.jit``, rebuild the model inside: ``lambda state, x:
      record_layer_inputs(nnx.merge(graphdef, state), x)``.

    Dense inputs ``[..., in]`` become rows ``[prod(...), in]`` (each token of a transformer
    is one input); conv inputs become :func:`conv_patches` with the layer's own strides,
    padding and dilation.

    Args:
      module: a linen module or an ``nnx.Module``.
      *args: linen: the variables (``{"params": ...}``) then the inputs; NNX: the inputs.
      layer_types: the layer classes to record (default: see above).
      **kwargs: keyword inputs of the call.

    Returns:
      ``{"<module path>/kernel": rows [n, d]}``; module paths are ``/``-joined
      (linen ``"Dense_0/kernel"``, NNX ``"layers/0/kernel"``, the attribute path);
      match them to parameter paths with :func:`gpm_representations`.

    Raises:
      ValueError: for grouped convolutions or convs with input dilation.
      TypeError: if ``module`` is neither a linen nor an NNX module.

    Example::

      reps = record_layer_inputs(model, {"params": params}, x[:300])  # linen
      reps = record_layer_inputs(nnx_model, x[:300])  # NNX
    """
    if isinstance(module, nnx.Module):
        return _record_nnx(module, args, kwargs, layer_types or (nnx.Linear, nnx.Conv))
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"record_layer_inputs: module={type(module).__name__} is neither a flax.linen "
            "nor a flax.nnx Module"
        )
    if not args:
        raise TypeError("record_layer_inputs: a linen module needs its variables")
    variables, args = args[0], args[1:]
    layer_types = layer_types or (nn.Dense, nn.Conv)
    recorded: dict[str, jax.Array] = {}

    def interceptor(next_fun, a, kw, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, layer_types):
            key = "/".join(str(s) for s in mod.path) + "/kernel"
            recorded[key] = _layer_rows(mod, a[0], key, isinstance(mod, nn.Conv))
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        module.apply(variables, *args, **kwargs)
    return recorded


def _record_nnx(
    model: nnx.Module, args: tuple, kwargs: dict, layer_types: tuple[type, ...]
) -> dict[str, jax.Array]:
    keys = {
        id(m): "/".join(str(k) for k in path) + "/kernel"
        for path, m in nnx.iter_modules(model)
        if path and isinstance(m, layer_types)
    }
    recorded: dict[str, jax.Array] = {}
    active: set[int] = set()
    classes = {type(m) for _, m in nnx.iter_modules(model) if id(m) in keys}
    saved = {cls: cls.__dict__.get("__call__") for cls in classes}

    def wrap(cls):
        inner = cls.__call__

        def __call__(self, *a, **kw):
            key = keys.get(id(self))
            if key is None or not a or id(self) in active:  # outermost call of a layer only
                return inner(self, *a, **kw)
            recorded[key] = _layer_rows(self, a[0], key, isinstance(self, nnx.Conv))
            active.add(id(self))
            try:
                return inner(self, *a, **kw)
            finally:
                active.discard(id(self))

        return __call__

    try:
        for cls in classes:
            cls.__call__ = wrap(cls)
        model(*args, **kwargs)
    finally:
        for cls, orig in saved.items():
            if orig is None:
                del cls.__call__
            else:
                cls.__call__ = orig
    return recorded


def gpm_representations(
    params: Any, targets: ct.Rules, recorded: dict[str, jax.Array]
) -> tuple[jax.Array, ...]:
    """Orders recorded layer inputs like the targets of :func:`gpm` (the hook's input).

    A target path matches a recorded key when the key's ``/``-separated parts end the path
    (``"params/Dense_0/kernel"`` matches ``"Dense_0/kernel"``).

    Args:
      params: the parameter tree given to the transform's ``init``.
      targets: the same rules given to :func:`gpm`.
      recorded: output of :func:`record_layer_inputs`.

    Returns:
      A tuple of ``[n, d]`` arrays in target order.

    Raises:
      ValueError: if a target has no recorded input (or several candidates).
    """
    out = []
    for p in select_targets(params, list(targets), method="gpm", allowed_ndim=(2, 4)):
        parts = p.split("/")
        hits = [k for k in recorded if parts[-len(k.split("/")) :] == k.split("/")]
        if len(hits) != 1:
            raise ValueError(
                f"gpm_representations: target {p!r} matches {len(hits)} recorded layers "
                f"({hits}); recorded keys are {sorted(recorded)}"
            )
        out.append(recorded[hits[0]])
    return tuple(out)
