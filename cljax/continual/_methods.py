"""Continual-learning methods for :func:`run_sequence`: factories of :class:`Method` around the
pure library functions of :mod:`cljax.losses` and :mod:`cljax.projection`.

Each factory checks its hyperparameters and returns a :class:`Method`, a NamedTuple of pure
hooks (the protocol of :mod:`cljax.stateful`) with a NamedTuple state of fixed structure (so
checkpoints restore into it). The loss-space baselines (EWC, LwF, L2) add a term to the loss;
the projection methods (GPM, CoSO, OSFT) wrap the optimiser with their transform and update
its state between tasks with the library's ``<method>_next_task`` functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax import losses as cl_losses
from cljax import projection as pj
from cljax import tree as ct
from cljax._checks import check_int, check_scalar
from cljax.continual._runner import _NEG, Method, TaskContext
from cljax.train import TrainState

__all__ = [
    "AnchorState",
    "TeacherState",
    "coso",
    "ewc",
    "gpm",
    "l2_anchor",
    "lwf",
    "naive",
    "no_task_loss",
    "osft",
    "prd",
]


class TeacherState(NamedTuple):
    """State of :func:`lwf` and :func:`prd`: the model frozen at the end of the last task.

    Attributes:
      teacher: a copy of the parameters (the initial ones until the first task ends).
      active: float32 scalar, 0 during the first task (no teacher yet), then 1.
    """

    teacher: Any
    active: jax.Array


class AnchorState(NamedTuple):
    """State of :func:`l2_anchor`: the weights at the end of the last task.

    Attributes:
      anchor: a copy of the parameters (the initial ones until the first task ends).
      active: float32 scalar, 0 during the first task, then 1.
    """

    anchor: Any
    active: jax.Array


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def naive(*, name: str = "naive") -> Method:
    """Naive fine-tuning: no protection at all (the lower bound).

    Args:
      name: state key.

    Returns:
      A :class:`Method` whose hooks are all the identity.
    """
    return Method(name=name)


def _fresh(params: Any) -> tuple[Any, jax.Array]:
    return _copy(params), jnp.zeros((), jnp.float32)


def _snapshot(params: Any) -> tuple[Any, jax.Array]:
    return _copy(params), jnp.ones((), jnp.float32)


def _set_state(state: TrainState, name: str, new: Any) -> TrainState:
    return state.replace(methods={**state.methods, name: new})


def ewc(
    *,
    weight: float,
    gamma: float = 1.0,
    fisher_samples: int = 200,
    name: str = "ewc",
) -> Method:
    """Online EWC with a diagonal empirical Fisher (Kirkpatrick et al. 2017; Schwarz et al. 2018).

    The state is :class:`cljax.losses.EWCState`; ``end_task`` computes the Fisher on the
    task's first ``fisher_samples`` training examples and folds it in with
    :func:`cljax.losses.ewc_next_task`.

    Args:
      weight: lambda of the penalty ``lambda/2 sum F (theta - theta*)^2``.
      gamma: decay of the accumulated Fisher (1 = sum over tasks).
      fisher_samples: training examples of the task used for the Fisher.
      name: state key.

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: if ``weight`` < 0, ``gamma`` outside [0, 1] or ``fisher_samples`` < 1.
    """
    check_scalar(weight, name="weight", where="ewc", low=0.0)
    check_scalar(gamma, name="gamma", where="ewc", low=0.0, high=1.0)
    check_int(fisher_samples, name="fisher_samples", where="ewc", low=1)
    nll_cache: dict[Any, Callable] = {}

    def nll_of(apply_fn):
        # One function object per apply_fn, so the Fisher's jitted program is reused.
        if apply_fn not in nll_cache:

            def nll(p, ex):
                z = apply_fn(p, ex["x"][None])[0]
                z = jnp.where(ex["mask"], z.astype(jnp.float32), _NEG)
                return -jax.nn.log_softmax(z)[ex["y"]]

            nll_cache[apply_fn] = nll
        return nll_cache[apply_fn]

    def init(params):
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        return cl_losses.EWCState(anchor=_copy(params), fisher=zeros)

    def loss(params, batch, logits, mstate, apply_fn):
        pen = cl_losses.ewc_penalty(params, mstate, weight=weight)
        return pen, {"penalty": pen}

    def end_task(state: TrainState, ctx: TaskContext) -> TrainState:
        b = ctx.train_batch(fisher_samples)
        n = len(b["y"])
        examples = {
            "x": b["x"],
            "y": b["y"],
            "mask": jnp.broadcast_to(b["mask"], (n, *b["mask"].shape)),
        }
        fisher = cl_losses.diagonal_fisher(
            nll_of(ctx.apply_fn), state.params, examples, chunk_size=100
        )
        prev = state.methods[name] if ctx.index > 0 else None
        new = cl_losses.ewc_next_task(prev, state.params, fisher, gamma=gamma)
        return _set_state(state, name, new)

    return Method(init=init, loss=loss, end_task=end_task, name=name)


def lwf(
    *,
    weight: float = 1.0,
    temperature: float = 2.0,
    scale_by_t2: bool = False,
    name: str = "lwf",
) -> Method:
    """Learning without Forgetting: distill the previous model's old-task outputs.

    The state is a :class:`TeacherState`, the model at the end of the last task.

    Args:
      weight: coefficient of the distillation term.
      temperature: softmax temperature (2 in Li & Hoiem).
      scale_by_t2: multiply the term by ``T^2`` (ZSCL's KD convention).
      name: state key.

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: if ``weight`` < 0 or ``temperature`` <= 0.

    References:
      Li and Hoiem, "Learning without Forgetting", ECCV 2016.
    """
    check_scalar(weight, name="weight", where="lwf", low=0.0)
    check_scalar(temperature, name="temperature", where="lwf", low=0.0, low_open=True)

    def init(params):
        return TeacherState(*_fresh(params))

    def loss(params, batch, logits, mstate, apply_fn):
        old = apply_fn(mstate.teacher, batch["x"])
        where = batch["old_mask"] | ~jnp.any(batch["old_mask"])  # avoid an all -inf row
        d = cl_losses.lwf_distillation(
            logits,
            old,
            temperature=temperature,
            where=where,
            scale_by_t2=scale_by_t2,
        )
        term = weight * mstate.active * d
        return term, {"distill": d}

    def end_task(state, ctx):
        return _set_state(state, name, TeacherState(*_snapshot(state.params)))

    return Method(init=init, loss=loss, end_task=end_task, name=name)


def l2_anchor(
    *, weight: float, reduction: Literal["sum", "mean"] = "sum", name: str = "l2"
) -> Method:
    """L2 to the previous task's weights (``reduction="sum"`` is ZSCL's consolidation).

    The state is an :class:`AnchorState`.

    Args:
      weight: coefficient.
      reduction: ``"sum"`` or ``"mean"`` over elements.
      name: state key.

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: if ``weight`` < 0 or ``reduction`` is not ``"sum"`` or ``"mean"``.
    """
    check_scalar(weight, name="weight", where="l2_anchor", low=0.0)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"l2_anchor: {reduction=} must be 'sum' or 'mean'")

    def init(params):
        return AnchorState(*_fresh(params))

    def loss(params, batch, logits, mstate, apply_fn):
        d = cl_losses.l2_anchor(params, mstate.anchor, reduction=reduction)
        return weight * mstate.active * d, {"distance": d}

    def end_task(state, ctx):
        return _set_state(state, name, AnchorState(*_snapshot(state.params)))

    return Method(init=init, loss=loss, end_task=end_task, name=name)


def gpm(
    targets: ct.Rules,
    record_fn: Callable[[Any, jax.Array], dict[str, jax.Array]],
    *,
    threshold: float | Sequence[float] | Callable[[int], Any] = 0.97,
    num_samples: int | Sequence[int] = 300,
    freeze_1d: bool | ct.Rules = True,
    name: str = "gpm",
) -> Method:
    """Gradient Projection Memory on the kernels selected by ``targets``.

    Chains :func:`cljax.projection.gpm` after the optimiser; ``end_task`` records the
    task's representations and extends the memory with
    :func:`cljax.projection.gpm_next_task`. The memory lives in the optimiser state (and
    survives the runner's optimiser resets).

    Args:
      targets: ``(regex, bool)`` rules of the protected kernels.
      record_fn: ``record_fn(params, x) -> {"<layer>/kernel": rows}``, e.g.
        ``lambda p, x: record_layer_inputs(model, {"params": p}, x)``.
      threshold: energy threshold(s) in (0, 1], or ``task -> threshold(s)`` (CIFAR's
        ``0.97 + 0.003 t``).
      num_samples: training examples recorded per task, one count for every target or one
        per target (the reference records 300 for each PMNIST layer and
        ``[24, 100, 100, 125, 125]`` for the five layers of its CIFAR AlexNet). A target's
        rows come from the first ``num_samples[k]`` examples (all their tokens or patches).
      freeze_1d: freeze 1-D parameters after the first task (see :func:`cljax.projection.gpm`).
      name: method name.

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: on a threshold outside (0, 1], a count < 1 or an empty count list; at
        the first ``end_task``, on a count list whose length is not the number of targets.
    """
    targets = list(targets)
    counts: list[int] | None = None  # one count per target, or None: one for all
    if isinstance(num_samples, int | np.integer):
        check_int(num_samples, name="num_samples", where="gpm", low=1)
    else:
        counts = list(num_samples)
        if not counts:
            raise ValueError("gpm: num_samples=[] must name one count per target")
        counts = [
            check_int(v, name=f"num_samples[{k}]", where="gpm", low=1) for k, v in enumerate(counts)
        ]
    if not callable(threshold):
        n = 1 if np.ndim(threshold) == 0 else len(cast(Sequence[float], threshold))
        pj._gpm._check_threshold(threshold, n)

    def wrap_optimizer(optimizer):
        return optax.chain(optimizer, pj.gpm(targets, freeze_1d=freeze_1d))

    def representations(params, ctx) -> list[jax.Array]:
        per = [int(cast(int, num_samples))] if counts is None else counts
        if counts is not None:
            n_targets = len(pj.select_targets(params, targets, method="gpm"))
            if len(per) != n_targets:
                raise ValueError(
                    f"gpm: got {len(per)} num_samples for {n_targets} targets; give one "
                    "count or one per target"
                )
        x = ctx.train_batch(max(per))["x"]
        by_count = {}
        for n in sorted(set(per)):  # one recording per distinct count
            by_count[n] = pj.gpm_representations(params, targets, record_fn(params, x[:n]))
        if counts is None:
            return list(by_count[per[0]])
        return [by_count[n][k] for k, n in enumerate(per)]

    def end_task(state, ctx):
        reps = representations(state.params, ctx)
        t = threshold(ctx.index) if callable(threshold) else threshold
        opt = pj.map_state(
            state.opt_state, pj.GPMState, lambda s: pj.gpm_next_task(s, reps, threshold=t)
        )
        return state.replace(opt_state=opt)

    return Method(
        end_task=end_task,
        wrap_optimizer=wrap_optimizer,
        persistent_states=(pj.GPMState,),
        name=name,
    )


def coso(
    learning_rate: optax.ScalarOrSchedule,
    targets: ct.Rules,
    *,
    threshold: float = 0.98,
    name: str = "coso",
    **coso_kwargs: Any,
) -> Method:
    """CoSO on the kernels selected by ``targets``; the base optimiser trains the rest.

    ``end_task`` extends the history with :func:`cljax.projection.coso_next_task`.

    Args:
      learning_rate: CoSO's learning rate (schedule restarts each task).
      targets: ``(regex, bool)`` rules of 2-D kernels.
      threshold: energy threshold of the history extension (0.98).
      name: method name.
      **coso_kwargs: :func:`cljax.projection.coso` options (``proj_rank``, ``sketch_rank``,
        ``svd``, ...).

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: on a threshold outside (0, 1], or a bad :func:`cljax.projection.coso`
        option.
    """
    pj._coso._check_threshold(threshold)
    rules = list(targets)
    tx = pj.coso(learning_rate, rules, **coso_kwargs)

    def others(params):
        return jax.tree.map(lambda m: not m, ct.rule_mask(params, rules, default=False))

    def wrap_optimizer(optimizer):
        return optax.chain(optax.masked(optimizer, others), tx)

    def end_task(state, ctx):
        opt = pj.map_state(
            state.opt_state, pj.CoSOState, lambda s: pj.coso_next_task(s, threshold=threshold)
        )
        return state.replace(opt_state=opt)

    return Method(
        end_task=end_task,
        wrap_optimizer=wrap_optimizer,
        persistent_states=(pj.CoSOState,),
        name=name,
    )


def osft(
    targets: ct.Rules,
    *,
    ratio: float | Sequence[float] | Callable[[int], Any] | str = 0.5,
    similarity_fn: Callable[[Any, jax.Array], Sequence[float]] | None = None,
    min_ratio: float = 0.1,
    max_ratio: float = 0.7,
    calibration_samples: int = 256,
    name: str = "osft",
) -> Method:
    """OSFT: freeze the top singular triplets of each target at every task start.

    ``begin_task`` re-decomposes the weights the task starts from with
    :func:`cljax.projection.osft_next_task`.

    Args:
      targets: ``(regex, bool)`` rules of 2-D kernels.
      ratio: retention ratio(s), or ``task -> ratio(s)`` (e.g. ``lambda t: rising_ratio(t)``),
        or ``"adaptive"`` with ``similarity_fn``.
      similarity_fn: for ``"adaptive"``: ``(params, x) -> per-target importances``
        (:func:`cljax.projection.io_cosine_similarity` on a calibration batch).
      min_ratio, max_ratio: bounds of the adaptive rule.
      calibration_samples: examples of the new task given to ``similarity_fn``.
      name: method name.

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: on a ratio outside [0, 1], an unknown ratio string, ``"adaptive"``
        without ``similarity_fn``, bounds outside [0, 1] or ``calibration_samples`` < 1.
    """
    if ratio == "adaptive" and similarity_fn is None:
        raise ValueError("osft: ratio='adaptive' needs a similarity_fn")
    if isinstance(ratio, str) and ratio != "adaptive":
        raise ValueError(f"osft: {ratio=} must be a number, a sequence, a callable or 'adaptive'")
    if not callable(ratio) and not isinstance(ratio, str):
        rs = [ratio] if np.ndim(ratio) == 0 else list(cast(Sequence[float], ratio))
        for k, r in enumerate(rs):
            check_scalar(
                r,
                name=f"ratio[{k}]" if len(rs) > 1 else "ratio",
                where="osft",
                low=0.0,
                high=1.0,
            )
    check_scalar(min_ratio, name="min_ratio", where="osft", low=0.0, high=1.0)
    check_scalar(max_ratio, name="max_ratio", where="osft", low=0.0, high=1.0)
    check_int(calibration_samples, name="calibration_samples", where="osft", low=1)
    targets = list(targets)

    def wrap_optimizer(optimizer):
        # Fixed ratios bound the frozen rank: bases that narrow cost proportionally less.
        fixed = not callable(ratio) and ratio != "adaptive"
        widest = float(np.max(ratio)) if fixed else 1.0
        return optax.chain(optimizer, pj.osft(targets, max_ratio=max(widest, 1e-6)))

    def ratios_of(params, ctx):
        if ratio == "adaptive":
            x = ctx.train_batch(calibration_samples)["x"]
            assert similarity_fn is not None  # checked above
            sims = similarity_fn(params, x)
            return pj.adaptive_ratios(sims, min_ratio=min_ratio, max_ratio=max_ratio)
        return ratio(ctx.index) if callable(ratio) else ratio

    def begin_task(state, ctx):
        ratios = ratios_of(state.params, ctx)
        weights = pj.target_leaves(state.params, targets)
        opt = pj.map_state(
            state.opt_state, pj.OSFTState, lambda s: pj.osft_next_task(s, weights, ratios=ratios)
        )
        return state.replace(opt_state=opt)

    return Method(
        begin_task=begin_task,
        wrap_optimizer=wrap_optimizer,
        persistent_states=(pj.OSFTState,),
        name=name,
    )


def no_task_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """A zero task loss, for :func:`run_sequence` with a method whose loss is the whole
    objective (:func:`prd`: no cross-entropy on the encoder)."""
    del logits, batch
    return jnp.zeros((), jnp.float32)


def prd(
    features_fn: Callable[[Any, jax.Array], jax.Array],
    projection_fn: Callable[[Any, jax.Array], jax.Array],
    prototypes_fn: Callable[[Any], jax.Array],
    augment_fn: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    groups: Sequence[int] | np.ndarray | None = None,
    temperature: float = 0.1,
    proto_weight: float = 4.0,
    distill_weight: float = 4.0,
    distill_temperature: float = 1.0,
    name: str = "prd",
) -> Method:
    """Prototype-sample relation distillation (Asadi et al., ICML 2023), replay-free.

    Its loss is the whole objective; run it with ``task_loss=no_task_loss``:

    * supervised contrastive loss (Khosla et al.) on two augmented views of the batch,
      through ``projection_fn``: this trains the encoder;
    * prototype loss, ``1 - cos`` between each (detached) feature and its class prototype:
      this trains the current classes' prototypes, not the encoder;
    * relation distillation from the model snapshot taken at the end of the previous task
      (encoder and prototypes; a :class:`TeacherState`): each sample's softmax over the old
      classes' prototypes (one softmax per old task, ``groups``), previous model vs current
      one, on both views as the official code. Old prototypes move with the representation
      through this term only.

    Predictions (``apply_fn``) are the scores against the prototypes,
    ``<f, w_c> / ||w_c||``; the runner's growing head masks the classes not seen yet.

    Args:
      features_fn: ``(params, x) -> [N, D]`` encoder features.
      projection_fn: ``(params, features) -> [N, P]`` the contrastive projection head.
      prototypes_fn: ``(params) -> [C, D]`` one prototype per output class.
      augment_fn: ``(key, x) -> x`` one random view of a batch.
      groups: ``[C]`` task index of each output class (the relation softmax runs within
        each old task's prototypes, as the official code's one head per task); ``None``:
        one softmax over all old classes.
      temperature: SupCon temperature (0.1 in the released sweeps).
      proto_weight, distill_weight: coefficients of the prototype and distillation terms.
      distill_temperature: temperature of the relation softmax (1 in the official code).
      name: state key.

    Returns:
      A :class:`Method`.

    Raises:
      ValueError: on a non-positive temperature, a negative weight, or ``groups`` that is
        not a non-empty ``[C]`` of task indices >= 0; in the loss, on ``groups`` whose
        length is not the head's.

    References:
      Asadi, Davari, Mudur, Aljundi & Belilovsky, "Prototype-Sample Relation Distillation:
      Towards Replay-Free Continual Learning", ICML 2023;
      https://github.com/naderAsadi/Probing-Continual-Learning (``methods/repe.py``).
    """
    check_scalar(temperature, name="temperature", where="prd", low=0.0, low_open=True)
    check_scalar(proto_weight, name="proto_weight", where="prd", low=0.0)
    check_scalar(distill_weight, name="distill_weight", where="prd", low=0.0)
    check_scalar(
        distill_temperature, name="distill_temperature", where="prd", low=0.0, low_open=True
    )
    group_of: np.ndarray | None = None
    if groups is not None:
        g = np.asarray(groups)
        if g.ndim != 1 or g.size == 0 or not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
            raise ValueError(f"prd: groups {g!r} must be a non-empty [C] of task indices >= 0")
        group_of = g.astype(np.int32)

    def where_of(old_mask: jax.Array) -> jax.Array:
        """``[G, C]`` prototypes taking part: old classes, one row per old task."""
        if group_of is None:
            return old_mask[None]
        if group_of.shape != old_mask.shape:
            raise ValueError(
                f"prd: groups has {group_of.shape[0]} classes, the head {old_mask.shape[0]}"
            )
        rows = np.arange(int(group_of.max()) + 1)[:, None] == group_of[None, :]
        return jnp.asarray(rows) & old_mask[None]

    def init(params):
        return TeacherState(*_fresh(params))

    def loss(params, batch, logits, mstate, apply_fn):
        k1, k2 = jax.random.split(batch["key"])
        x1, x2 = augment_fn(k1, batch["x"]), augment_fn(k2, batch["x"])
        y = batch["y"]
        f1, f2 = features_fn(params, x1), features_fn(params, x2)
        z = jnp.stack([projection_fn(params, f1), projection_fn(params, f2)], axis=1)
        supcon = cl_losses.supervised_contrastive_loss(z, y, temperature=temperature)
        w = prototypes_fn(params)
        proto = cl_losses.prototype_loss(jnp.concatenate([f1, f2]), jnp.concatenate([y, y]), w)
        teacher = mstate.teacher
        both = jnp.concatenate([x1, x2])  # both views, as the official code's aug_data
        tf = jax.lax.stop_gradient(features_fn(teacher, both))
        tw = jax.lax.stop_gradient(prototypes_fn(teacher))
        where = where_of(batch["old_mask"])
        n_groups = where.shape[0]
        distill = cl_losses.relation_distillation(
            jnp.concatenate([f1, f2]),
            tf,
            jnp.broadcast_to(w, (n_groups, *w.shape)),
            jnp.broadcast_to(tw, (n_groups, *tw.shape)),
            temperature=distill_temperature,
            where=where,
        )
        distill = mstate.active * distill
        total = supcon + proto_weight * proto + distill_weight * distill
        return total, {"supcon": supcon, "proto": proto, "distill": distill}

    def end_task(state, ctx):
        return _set_state(state, name, TeacherState(*_snapshot(state.params)))

    return Method(init=init, loss=loss, end_task=end_task, name=name)
