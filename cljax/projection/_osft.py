"""OSFT: orthogonal subspace fine-tuning with adaptive SVD ("Sculpting Subspaces", Nayak et al. 2025).

At the start of each task every target matrix is decomposed from its *current* value,
``W = U S V^T``; the top-``k`` singular triplets are frozen and only the rest may change.

**Implementation choice (a deviation in form, not in the constraint).** The reference
(``mini_trainer``'s ``osft_utils.py``) reparametrises ``W = U_h S_h V_h^T + U_l S_l V_l^T``,
trains the factors ``(U_l, S_l, V_l)``, projects their gradients and (newer versions) the
factors themselves after the optimiser step so that ``U_l ⟂ U_h`` and ``V_l ⟂ V_h``. Here
the full matrix is trained and the **final update** (after Adam) is projected onto the
complement on both sides,

    ``dW <- (I - U_h U_h^T) dW (I - V_h V_h^T)``.

Both keep exactly the same set of weights reachable: ``W - U_h S_h V_h^T`` has its column
space ``⟂ U_h`` and its row space ``⟂ V_h`` -- the constraint of the factorised form, whose
low part can represent any such matrix since its rank budget ``min(in, out) - k`` is the
dimension of the complement. Consequently inputs in ``span(U_h)`` (Flax input side) keep
their outputs and no output moves along ``span(V_h)``. What differs is the optimisation
geometry: gradient steps on the factors precondition the update by the current factors
(``dU_l = G V_l S_l`` etc.), a full-matrix step does not; and no ``U_l, S_l, V_l`` are stored
(memory ``~ 2 · max_ratio · W`` here for the padded bases, ``~ 3 x W`` for a factorised
copy).

Layout: Flax kernels are ``[in, out]``; ``U`` spans the input side and ``V`` the output
side (the reference's ``V`` and ``U`` of the PyTorch ``[out, in]`` weight).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import tree as ct
from cljax.projection._common import check_finite_inputs, select_targets

__all__ = [
    "OSFTState",
    "adaptive_ratios",
    "io_cosine_similarity",
    "osft",
    "osft_next_task",
    "osft_ranks",
    "rising_ratio",
    "target_leaves",
]


class OSFTState(NamedTuple):
    """State of :func:`osft` (per-target tuples, in target order).

    Attributes:
      u_high: ``[in, m]`` frozen input-side singular vectors (first ``rank`` columns, rest 0;
        ``m`` is fixed by :func:`osft`'s ``max_ratio``).
      v_high: ``[out, m]`` frozen output-side singular vectors (likewise).
      rank: int32 ``k``, number of frozen triplets.
      task: int32 number of decompositions done.
    """

    u_high: tuple[jax.Array, ...]
    v_high: tuple[jax.Array, ...]
    rank: tuple[jax.Array, ...]
    task: jax.Array


def target_leaves(params: Any, targets: ct.Rules, *, method: str = "osft") -> tuple[Any, ...]:
    """The 2-D leaves selected by ``targets``, in the order the projection states use."""
    by_path = dict(ct.leaves_with_paths(params))
    return tuple(by_path[p] for p in select_targets(params, list(targets), method=method))


def osft(targets: ct.Rules, *, max_ratio: float = 1.0) -> optax.GradientTransformationExtraArgs:
    """Projects target updates off the frozen top singular spaces (two-sided).

    Put it last in the chain, after the optimiser. Before each task, call
    :func:`osft_next_task` with the current weights and the rank ratios. Until the first
    call nothing is frozen.

    The frozen bases are stored ``[in, m]`` and ``[out, m]`` with a static width
    ``m = floor(max_ratio · min(in, out))`` (at least 1), the ranks used zero-padded to it:
    shapes stay fixed across tasks (one compilation, checkpoints restore into the same
    state) and the projection costs ``4 · in · out · m`` flops per target. Set ``max_ratio``
    to the largest retention ratio the schedule will use (e.g. 0.5 for a fixed ratio of 0.5)
    to halve that cost against the default full width.

    Args:
      targets: ``(regex, bool)`` rules selecting 2-D ``[in, out]`` kernels (attention and MLP
        projections in the reference; not embeddings, norms or heads).
      max_ratio: the largest fraction of ``min(in, out)`` that will ever be frozen, in
        ``(0, 1]``; :func:`osft_next_task` refuses a larger rank.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an :class:`OSFTState`.

    Raises:
      ValueError: if ``max_ratio`` is outside ``(0, 1]``; (at ``init``) if the rules select
        nothing or a target is not 2-D.

    Example::

      tx = optax.chain(optax.adamw(1e-5), osft([(r"(q|k|v|o|up|down)/kernel", True)]))
      opt_state = map_state(opt_state, OSFTState,
                            lambda s: osft_next_task(s, target_leaves(params, rules), ratios=0.5))

    References:
      Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
      Learning", 2025 (``mini_trainer/osft_utils.py``).
    """
    targets = list(targets)
    if not 0.0 < float(max_ratio) <= 1.0:
        raise ValueError(f"osft: {max_ratio=} must be in (0, 1]")

    def init_fn(params):
        paths = select_targets(params, targets, method="osft")
        by_path = dict(ct.leaves_with_paths(params))
        uh, vh, rk = [], [], []
        for p in paths:
            n_in, n_out = jnp.shape(by_path[p])
            m = basis_width(n_in, n_out, max_ratio)
            uh.append(jnp.zeros((n_in, m), jnp.float32))
            vh.append(jnp.zeros((n_out, m), jnp.float32))
            rk.append(jnp.zeros((), jnp.int32))
        return OSFTState(tuple(uh), tuple(vh), tuple(rk), jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        paths = select_targets(updates, targets, method="osft")
        index = {p: i for i, p in enumerate(paths)}
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        out = []
        for kp, u in flat:
            p = ct.path_str(kp)
            if p in index:
                i = index[p]
                a, b = state.u_high[i], state.v_high[i]
                d = u.astype(jnp.float32)
                d = d - a @ (a.T @ d)
                d = d - (d @ b) @ b.T
                u = d.astype(u.dtype)
            out.append(u)
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def basis_width(n_in: int, n_out: int, max_ratio: float) -> int:
    """The static width of a target's frozen bases: ``floor(max_ratio · min(in, out))``, >= 1."""
    m = min(n_in, n_out)
    return max(1, min(m, int(np.floor(float(max_ratio) * m))))


@functools.partial(jax.jit, static_argnames="width")
def _decompose(w, k, width):
    u, _, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    keep = jnp.arange(width) < k
    return u[:, :width] * keep, vt.T[:, :width] * keep


def osft_ranks(shapes: Sequence[tuple[int, ...]], ratios: float | Sequence[float]) -> list[int]:
    """Frozen ranks ``k = floor(ratio * min(in, out))``, capped at ``min(in, out) - 1``.

    The cap follows mini_trainer (at least one direction stays trainable).

    Args:
      shapes: target shapes.
      ratios: one ratio in [0, 1] for all, or one per target.

    Returns:
      The integer ranks.

    Raises:
      ValueError: on ratios outside [0, 1] or a count mismatch.
    """
    one = np.ndim(ratios) == 0
    rs: list[Any] = [ratios] * len(shapes) if one else list(cast(Sequence[float], ratios))
    if len(rs) != len(shapes):
        raise ValueError(f"osft_ranks: got {len(rs)} ratios for {len(shapes)} targets")
    out = []
    for r, (a, b) in zip(rs, shapes, strict=True):
        if not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"osft_ranks: ratio={float(r)} must be in [0, 1]")
        m = min(a, b)
        out.append(int(min(np.floor(float(r) * m), m - 1)))
    return out


def osft_next_task(
    state: OSFTState, weights: Sequence[jax.typing.ArrayLike], *, ratios: float | Sequence[float]
) -> OSFTState:
    """Between-task hook: re-decompose the current weights and freeze their top-k triplets.

    Args:
      state: the :class:`OSFTState`.
      weights: current target matrices in target order (:func:`target_leaves`).
      ratios: retention ratios (fraction of ``min(in, out)`` frozen), one or per target;
        see :func:`rising_ratio` and :func:`adaptive_ratios` for the paper's schedules.

    Returns:
      The state with new frozen bases and ``task + 1``.

    Raises:
      ValueError: on a count/shape mismatch, ratios outside [0, 1], or a weight holding
        NaN or Inf.

    References:
      Nayak et al., "Sculpting Subspaces", 2025.
    """
    weights = list(weights)
    if len(weights) != len(state.u_high):
        raise ValueError(
            f"osft_next_task: got {len(weights)} weights for {len(state.u_high)} targets"
        )
    for i, (w, a, b) in enumerate(zip(weights, state.u_high, state.v_high, strict=True)):
        if jnp.shape(w) != (a.shape[0], b.shape[0]):
            raise ValueError(
                f"osft_next_task: weight {i} has shape {jnp.shape(w)}; "
                f"expected {(a.shape[0], b.shape[0])}"
            )
    check_finite_inputs(weights, where="osft_next_task", what="weight")
    ks = osft_ranks([jnp.shape(w) for w in weights], ratios)
    for i, (k, a) in enumerate(zip(ks, state.u_high, strict=True)):
        if k > a.shape[1]:
            raise ValueError(
                f"osft_next_task: target {i} would freeze rank {k}, above the {a.shape[1]} "
                "columns its state holds; build the transform with a larger "
                "osft(max_ratio=...)"
            )
    uh, vh = [], []
    for w, k, a in zip(weights, ks, state.u_high, strict=True):
        a, b = _decompose(jnp.asarray(w), k, a.shape[1])
        uh.append(a)
        vh.append(b)
    return OSFTState(
        tuple(uh),
        tuple(vh),
        tuple(jnp.asarray(k, jnp.int32) for k in ks),
        state.task + 1,
    )


def rising_ratio(task: int, *, start: float = 0.07, step: float = 0.07) -> float:
    """Retention ratio rising per task, ``min(start + step * task, 1)``.

    The reference's T5 15-task script freezes ``floor(max(in, out) * s)`` triplets with
    ``s = 0.07`` growing by 0.07 per task; here the ratio is of ``min(in, out)``
    (:func:`osft_ranks`), the only size that is a valid rank for non-square matrices.

    Raises:
      ValueError: on a negative task or ratio parameters outside [0, 1].
    """
    if task < 0:
        raise ValueError(f"rising_ratio: {task=} must be >= 0")
    if not (0.0 <= start <= 1.0 and 0.0 <= step <= 1.0):
        raise ValueError(f"rising_ratio: {start=} and {step=} must be in [0, 1]")
    return float(min(start + step * task, 1.0))


def io_cosine_similarity(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> float:
    """Mean cosine similarity between a layer's input and output rows (calibration batch).

    Args:
      x: ``[..., d]`` inputs.
      y: ``[..., d]`` outputs of the same width (a residual block, a square projection).

    Returns:
      ``mean_n cos(x_n, y_n)``.

    Raises:
      ValueError: if the shapes differ (input-output similarity needs equal widths).
    """
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(
            f"io_cosine_similarity: input {x.shape} and output {y.shape} differ; measure "
            "it on blocks whose input and output widths agree"
        )
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    num = jnp.sum(x * y, -1)
    den = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
    return float(jnp.mean(num / jnp.maximum(den, 1e-12)))


def adaptive_ratios(
    similarities: Sequence[float], *, min_ratio: float = 0.1, max_ratio: float = 0.7
) -> list[float]:
    """The paper's adaptive rule: importance from input-output similarity -> retention ratio.

    ``I_n = I / mean(I)`` and ``r = min_ratio + I_n (max_ratio - min_ratio)``, clipped to
    [0, 1] (layers more important than average retain more than ``max_ratio``;
    :func:`osft_ranks` still leaves one direction trainable).

    Args:
      similarities: per target, the importance score (e.g. :func:`io_cosine_similarity`).
      min_ratio, max_ratio: ``mrr`` and ``trr`` of the paper, ``0 <= mrr <= trr <= 1``.

    Returns:
      Per-target ratios.

    Raises:
      ValueError: on bad ratios, an empty list or a non-positive mean importance.

    References:
      Nayak et al., "Sculpting Subspaces", 2025 (the rule appears only as commented code in
      the reference's T5 notebook; the OSFT reference, mini_trainer osft_utils.py).
    """
    if not 0.0 <= min_ratio <= max_ratio <= 1.0:
        raise ValueError(f"adaptive_ratios: need 0 <= {min_ratio=} <= {max_ratio=} <= 1")
    s = np.asarray(similarities, np.float64)
    if s.size == 0:
        raise ValueError("adaptive_ratios: got no similarities")
    if s.mean() <= 0:
        raise ValueError(f"adaptive_ratios: mean importance {s.mean()} must be positive")
    r = min_ratio + (s / s.mean()) * (max_ratio - min_ratio)
    return [float(v) for v in np.clip(r, 0.0, 1.0)]
