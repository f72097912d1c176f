"""Continual-learning methods for :func:`run_sequence`: thin objects around the pure library
functions of :mod:`cljax.losses` and :mod:`cljax.projection`.

Each method keeps a fixed-structure state (so checkpoints restore into it) and does its work
in pure hooks. The loss-space baselines (EWC, LwF, L2) add a term to the loss; the projection
methods (GPM, CoSO, OSFT) wrap the optimiser with their transform and update its state
between tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

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

__all__ = ["PRD", "CoSO", "EWC", "GPM", "L2Anchor", "LwF", "Naive", "OSFT", "no_task_loss"]


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _float_mask(params: Any) -> Any:
    return jax.tree.map(ct.is_float, params)


class Naive(Method):
    """Naive fine-tuning: no protection at all (the lower bound)."""

    name = "naive"


class EWC(Method):
    """Online EWC with a diagonal empirical Fisher (Kirkpatrick et al. 2017; Schwarz et al. 2018).

    Args:
      weight: lambda of the penalty ``lambda/2 sum F (theta - theta*)^2``.
      gamma: decay of the accumulated Fisher (1 = sum over tasks).
      fisher_samples: training examples of the task used for the Fisher.
      name: state key.
    """

    def __init__(
        self,
        *,
        weight: float,
        gamma: float = 1.0,
        fisher_samples: int = 200,
        name: str = "ewc",
    ):
        check_scalar(weight, name="weight", where="EWC", low=0.0)
        check_scalar(gamma, name="gamma", where="EWC", low=0.0, high=1.0)
        check_int(fisher_samples, name="fisher_samples", where="EWC", low=1)
        self.weight, self.gamma, self.fisher_samples, self.name = (
            weight,
            gamma,
            fisher_samples,
            name,
        )

    def init(self, params):
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        return cl_losses.EWCState(anchor=_copy(params), fisher=zeros)

    def loss(self, params, batch, logits, mstate, apply_fn):
        pen = cl_losses.ewc_penalty(params, mstate, weight=self.weight)
        return pen, {"penalty": pen}

    def _nll(self, apply_fn):
        # One function object per apply_fn, so the Fisher's jitted program is reused.
        cache = self.__dict__.setdefault("_nll_cache", {})
        if apply_fn not in cache:

            def nll(p, ex):
                z = apply_fn(p, ex["x"][None])[0]
                z = jnp.where(ex["mask"], z.astype(jnp.float32), _NEG)
                return -jax.nn.log_softmax(z)[ex["y"]]

            cache[apply_fn] = nll
        return cache[apply_fn]

    def end_task(self, state: TrainState, ctx: TaskContext) -> TrainState:
        b = ctx.train_batch(self.fisher_samples)
        nll = self._nll(ctx.apply_fn)
        n = len(b["y"])
        examples = {
            "x": b["x"],
            "y": b["y"],
            "mask": jnp.broadcast_to(b["mask"], (n, *b["mask"].shape)),
        }
        fisher = cl_losses.diagonal_fisher(nll, state.params, examples, chunk_size=100)
        prev = state.methods[self.name] if ctx.index > 0 else None
        new = cl_losses.ewc_next_task(prev, state.params, fisher, gamma=self.gamma)
        return state.replace(methods={**state.methods, self.name: new})


class LwF(Method):
    """Learning without Forgetting: distill the previous model's old-task outputs.

    Args:
      weight: coefficient of the distillation term.
      temperature: softmax temperature (2 in Li & Hoiem).
      scale_by_t2: multiply the term by ``T^2`` (ZSCL's KD convention).
      name: state key.
    """

    def __init__(
        self,
        *,
        weight: float = 1.0,
        temperature: float = 2.0,
        scale_by_t2: bool = False,
        name: str = "lwf",
    ):
        check_scalar(weight, name="weight", where="LwF", low=0.0)
        check_scalar(temperature, name="temperature", where="LwF", low=0.0, low_open=True)
        self.weight, self.temperature, self.scale_by_t2, self.name = (
            weight,
            temperature,
            scale_by_t2,
            name,
        )

    def init(self, params):
        return {"teacher": _copy(params), "active": jnp.zeros((), jnp.float32)}

    def loss(self, params, batch, logits, mstate, apply_fn):
        old = apply_fn(mstate["teacher"], batch["x"])
        where = batch["old_mask"] | ~jnp.any(batch["old_mask"])  # avoid an all -inf row
        d = cl_losses.lwf_distillation(
            logits,
            old,
            temperature=self.temperature,
            where=where,
            scale_by_t2=self.scale_by_t2,
        )
        term = self.weight * mstate["active"] * d
        return term, {"distill": d}

    def end_task(self, state, ctx):
        new = {"teacher": _copy(state.params), "active": jnp.ones((), jnp.float32)}
        return state.replace(methods={**state.methods, self.name: new})


class L2Anchor(Method):
    """L2 to the previous task's weights (``reduction="sum"`` is ZSCL's consolidation).

    Args:
      weight: coefficient.
      reduction: ``"sum"`` or ``"mean"`` over elements.
      name: state key.
    """

    def __init__(
        self, *, weight: float, reduction: Literal["sum", "mean"] = "sum", name: str = "l2"
    ):
        check_scalar(weight, name="weight", where="L2Anchor", low=0.0)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"L2Anchor: {reduction=} must be 'sum' or 'mean'")
        self.weight, self.name = weight, name
        self.reduction: Literal["sum", "mean"] = reduction

    def init(self, params):
        return {"anchor": _copy(params), "active": jnp.zeros((), jnp.float32)}

    def loss(self, params, batch, logits, mstate, apply_fn):
        d = cl_losses.l2_anchor(params, mstate["anchor"], reduction=self.reduction)
        return self.weight * mstate["active"] * d, {"distance": d}

    def end_task(self, state, ctx):
        new = {"anchor": _copy(state.params), "active": jnp.ones((), jnp.float32)}
        return state.replace(methods={**state.methods, self.name: new})


class GPM(Method):
    """Gradient Projection Memory on the kernels selected by ``targets``.

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
    """

    persistent_states = (pj.GPMState,)

    def __init__(
        self,
        targets: ct.Rules,
        record_fn: Callable[[Any, jax.Array], dict[str, jax.Array]],
        *,
        threshold: float | Sequence[float] | Callable[[int], Any] = 0.97,
        num_samples: int | Sequence[int] = 300,
        freeze_1d: bool | ct.Rules = True,
        name: str = "gpm",
    ):
        self.targets, self.record_fn, self.threshold = list(targets), record_fn, threshold
        self._counts: list[int] | None = None  # one count per target, or None: one for all
        if isinstance(num_samples, int | np.integer):
            check_int(num_samples, name="num_samples", where="GPM", low=1)
        else:
            counts = list(num_samples)
            if not counts:
                raise ValueError("GPM: num_samples=[] must name one count per target")
            self._counts = [
                check_int(v, name=f"num_samples[{k}]", where="GPM", low=1)
                for k, v in enumerate(counts)
            ]
        self.num_samples, self.freeze_1d, self.name = num_samples, freeze_1d, name
        if not callable(threshold):
            n = 1 if np.ndim(threshold) == 0 else len(cast(Sequence[float], threshold))
            pj._gpm._check_threshold(threshold, n)

    def wrap_optimizer(self, optimizer):
        return optax.chain(optimizer, pj.gpm(self.targets, freeze_1d=self.freeze_1d))

    def _representations(self, params, ctx) -> list[jax.Array]:
        one = self._counts is None
        counts = [int(cast(int, self.num_samples))] if self._counts is None else self._counts
        if not one:
            n_targets = len(pj.select_targets(params, self.targets, method="gpm"))
            if len(counts) != n_targets:
                raise ValueError(
                    f"GPM: got {len(counts)} num_samples for {n_targets} targets; give one "
                    "count or one per target"
                )
        x = ctx.train_batch(max(counts))["x"]
        by_count = {}
        for n in sorted(set(counts)):  # one recording per distinct count
            by_count[n] = pj.gpm_representations(
                params, self.targets, self.record_fn(params, x[:n])
            )
        if one:
            return list(by_count[counts[0]])
        return [by_count[n][k] for k, n in enumerate(counts)]

    def end_task(self, state, ctx):
        reps = self._representations(state.params, ctx)
        t = self.threshold(ctx.index) if callable(self.threshold) else self.threshold
        opt = pj.map_state(
            state.opt_state, pj.GPMState, lambda s: pj.gpm_next_task(s, reps, threshold=t)
        )
        return state.replace(opt_state=opt)


class CoSO(Method):
    """CoSO on the kernels selected by ``targets``; the base optimiser trains the rest.

    Args:
      learning_rate: CoSO's learning rate (schedule restarts each task).
      targets: ``(regex, bool)`` rules of 2-D kernels.
      threshold: energy threshold of the history extension (0.98).
      name: method name.
      **coso_kwargs: :func:`cljax.projection.coso` options (``proj_rank``, ``sketch_rank``,
        ``svd``, ...).
    """

    persistent_states = (pj.CoSOState,)

    def __init__(
        self,
        learning_rate: optax.ScalarOrSchedule,
        targets: ct.Rules,
        *,
        threshold: float = 0.98,
        name: str = "coso",
        **coso_kwargs: Any,
    ):
        pj._coso._check_threshold(threshold)
        self.targets, self.threshold, self.name = list(targets), threshold, name
        self._tx = pj.coso(learning_rate, self.targets, **coso_kwargs)

    def wrap_optimizer(self, optimizer):
        rules = self.targets

        def others(params):
            return jax.tree.map(lambda m: not m, ct.rule_mask(params, rules, default=False))

        return optax.chain(optax.masked(optimizer, others), self._tx)

    def end_task(self, state, ctx):
        opt = pj.map_state(
            state.opt_state, pj.CoSOState, lambda s: pj.coso_next_task(s, threshold=self.threshold)
        )
        return state.replace(opt_state=opt)


class OSFT(Method):
    """OSFT: freeze the top singular triplets of each target at every task start.

    Args:
      targets: ``(regex, bool)`` rules of 2-D kernels.
      ratio: retention ratio(s), or ``task -> ratio(s)`` (e.g. ``lambda t: rising_ratio(t)``),
        or ``"adaptive"`` with ``similarity_fn``.
      similarity_fn: for ``"adaptive"``: ``(params, x) -> per-target importances``
        (:func:`cljax.projection.io_cosine_similarity` on a calibration batch).
      min_ratio, max_ratio: bounds of the adaptive rule.
      calibration_samples: examples of the new task given to ``similarity_fn``.
      name: method name.
    """

    persistent_states = (pj.OSFTState,)

    def __init__(
        self,
        targets: ct.Rules,
        *,
        ratio: float | Sequence[float] | Callable[[int], Any] | str = 0.5,
        similarity_fn: Callable[[Any, jax.Array], Sequence[float]] | None = None,
        min_ratio: float = 0.1,
        max_ratio: float = 0.7,
        calibration_samples: int = 256,
        name: str = "osft",
    ):
        if ratio == "adaptive" and similarity_fn is None:
            raise ValueError("OSFT: ratio='adaptive' needs a similarity_fn")
        if isinstance(ratio, str) and ratio != "adaptive":
            raise ValueError(
                f"OSFT: {ratio=} must be a number, a sequence, a callable or 'adaptive'"
            )
        if not callable(ratio) and not isinstance(ratio, str):
            rs = [ratio] if np.ndim(ratio) == 0 else list(cast(Sequence[float], ratio))
            for k, r in enumerate(rs):
                check_scalar(
                    r,
                    name=f"ratio[{k}]" if len(rs) > 1 else "ratio",
                    where="OSFT",
                    low=0.0,
                    high=1.0,
                )
        check_scalar(min_ratio, name="min_ratio", where="OSFT", low=0.0, high=1.0)
        check_scalar(max_ratio, name="max_ratio", where="OSFT", low=0.0, high=1.0)
        check_int(calibration_samples, name="calibration_samples", where="OSFT", low=1)
        self.targets, self.ratio, self.similarity_fn = list(targets), ratio, similarity_fn
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self.calibration_samples, self.name = calibration_samples, name

    def wrap_optimizer(self, optimizer):
        # Fixed ratios bound the frozen rank: bases that narrow cost proportionally less.
        fixed = not callable(self.ratio) and self.ratio != "adaptive"
        widest = float(np.max(cast(float | Sequence[float], self.ratio))) if fixed else 1.0
        return optax.chain(optimizer, pj.osft(self.targets, max_ratio=max(widest, 1e-6)))

    def _ratios(self, params, ctx):
        if self.ratio == "adaptive":
            x = ctx.train_batch(self.calibration_samples)["x"]
            assert self.similarity_fn is not None  # checked in __init__
            sims = self.similarity_fn(params, x)
            return pj.adaptive_ratios(sims, min_ratio=self.min_ratio, max_ratio=self.max_ratio)
        return self.ratio(ctx.index) if callable(self.ratio) else self.ratio

    def begin_task(self, state, ctx):
        ratios = self._ratios(state.params, ctx)
        weights = pj.target_leaves(state.params, self.targets)
        opt = pj.map_state(
            state.opt_state, pj.OSFTState, lambda s: pj.osft_next_task(s, weights, ratios=ratios)
        )
        return state.replace(opt_state=opt)


def no_task_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """A zero task loss, for :func:`run_sequence` with a method whose loss is the whole
    objective (:class:`PRD`: no cross-entropy on the encoder)."""
    del logits, batch
    return jnp.zeros((), jnp.float32)


class PRD(Method):
    """Prototype-sample relation distillation (Asadi et al., ICML 2023), replay-free.

    Its loss is the whole objective; run it with ``task_loss=no_task_loss``:

    * supervised contrastive loss (Khosla et al.) on two augmented views of the batch,
      through ``projection_fn``: this trains the encoder;
    * prototype loss, ``1 - cos`` between each (detached) feature and its class prototype:
      this trains the current classes' prototypes, not the encoder;
    * relation distillation from the model snapshot taken at the end of the previous task
      (encoder and prototypes): each sample's softmax over the old classes' prototypes
      (one softmax per old task, ``groups``), previous model vs current one, on both views
      as the official code. Old prototypes move with the representation through this term
      only.

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

    References:
      Asadi, Davari, Mudur, Aljundi & Belilovsky, "Prototype-Sample Relation Distillation:
      Towards Replay-Free Continual Learning", ICML 2023;
      https://github.com/naderAsadi/Probing-Continual-Learning (``methods/repe.py``).
    """

    def __init__(
        self,
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
    ):
        check_scalar(temperature, name="temperature", where="PRD", low=0.0, low_open=True)
        check_scalar(proto_weight, name="proto_weight", where="PRD", low=0.0)
        check_scalar(distill_weight, name="distill_weight", where="PRD", low=0.0)
        check_scalar(
            distill_temperature, name="distill_temperature", where="PRD", low=0.0, low_open=True
        )
        if groups is not None:
            g = np.asarray(groups)
            if g.ndim != 1 or g.size == 0 or not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
                raise ValueError(f"PRD: groups {g!r} must be a non-empty [C] of task indices >= 0")
            self._groups = g.astype(np.int32)
        else:
            self._groups = None
        self.features_fn, self.projection_fn = features_fn, projection_fn
        self.prototypes_fn, self.augment_fn = prototypes_fn, augment_fn
        self.temperature, self.proto_weight = temperature, proto_weight
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature
        self.name = name

    def init(self, params):
        return {"teacher": _copy(params), "active": jnp.zeros((), jnp.float32)}

    def _where(self, old_mask: jax.Array) -> jax.Array:
        """``[G, C]`` prototypes taking part: old classes, one row per old task."""
        if self._groups is None:
            return old_mask[None]
        g = self._groups
        if g.shape != old_mask.shape:
            raise ValueError(f"PRD: groups has {g.shape[0]} classes, the head {old_mask.shape[0]}")
        rows = np.arange(int(g.max()) + 1)[:, None] == g[None, :]
        return jnp.asarray(rows) & old_mask[None]

    def loss(self, params, batch, logits, mstate, apply_fn):
        k1, k2 = jax.random.split(batch["key"])
        x1, x2 = self.augment_fn(k1, batch["x"]), self.augment_fn(k2, batch["x"])
        y = batch["y"]
        f1, f2 = self.features_fn(params, x1), self.features_fn(params, x2)
        z = jnp.stack([self.projection_fn(params, f1), self.projection_fn(params, f2)], axis=1)
        supcon = cl_losses.supervised_contrastive_loss(z, y, temperature=self.temperature)
        w = self.prototypes_fn(params)
        proto = cl_losses.prototype_loss(jnp.concatenate([f1, f2]), jnp.concatenate([y, y]), w)
        teacher = mstate["teacher"]
        both = jnp.concatenate([x1, x2])  # both views, as the official code's aug_data
        tf = jax.lax.stop_gradient(self.features_fn(teacher, both))
        tw = jax.lax.stop_gradient(self.prototypes_fn(teacher))
        where = self._where(batch["old_mask"])
        n_groups = where.shape[0]
        distill = cl_losses.relation_distillation(
            jnp.concatenate([f1, f2]),
            tf,
            jnp.broadcast_to(w, (n_groups, *w.shape)),
            jnp.broadcast_to(tw, (n_groups, *tw.shape)),
            temperature=self.distill_temperature,
            where=where,
        )
        distill = mstate["active"] * distill
        total = supcon + self.proto_weight * proto + self.distill_weight * distill
        return total, {"supcon": supcon, "proto": proto, "distill": distill}

    def end_task(self, state, ctx):
        new = {"teacher": _copy(state.params), "active": jnp.ones((), jnp.float32)}
        return state.replace(methods={**state.methods, self.name: new})
