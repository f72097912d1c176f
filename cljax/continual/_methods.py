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
from cljax.continual._runner import _NEG, Method, TaskContext
from cljax.train import TrainState

__all__ = ["CoSO", "EWC", "GPM", "L2Anchor", "LwF", "Naive", "OSFT"]


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
      strength: lambda of the penalty ``lambda/2 sum F (theta - theta*)^2``.
      gamma: decay of the accumulated Fisher (1 = sum over tasks).
      fisher_samples: training examples of the task used for the Fisher.
      name: state key.
    """

    def __init__(
        self,
        strength: float,
        *,
        gamma: float = 1.0,
        fisher_samples: int = 200,
        name: str = "ewc",
    ):
        if strength < 0:
            raise ValueError(f"EWC: {strength=} must be >= 0")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"EWC: {gamma=} must be in [0, 1]")
        if fisher_samples < 1:
            raise ValueError(f"EWC: {fisher_samples=} must be >= 1")
        self.strength, self.gamma, self.fisher_samples, self.name = (
            strength,
            gamma,
            fisher_samples,
            name,
        )

    def init(self, params):
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        return cl_losses.EWCState(anchor=_copy(params), fisher=zeros)

    def loss(self, params, batch, logits, mstate, apply_fn):
        pen = cl_losses.ewc_penalty(params, mstate, strength=self.strength)
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
        new = cl_losses.ewc_update(prev, state.params, fisher, gamma=self.gamma)
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
        weight: float = 1.0,
        *,
        temperature: float = 2.0,
        scale_by_t2: bool = False,
        name: str = "lwf",
    ):
        if weight < 0:
            raise ValueError(f"LwF: {weight=} must be >= 0")
        if temperature <= 0:
            raise ValueError(f"LwF: {temperature=} must be positive")
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
        self, weight: float, *, reduction: Literal["sum", "mean"] = "sum", name: str = "l2"
    ):
        if weight < 0:
            raise ValueError(f"L2Anchor: {weight=} must be >= 0")
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
      num_samples: training examples recorded per task (300 for PMNIST in the reference).
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
        num_samples: int = 300,
        freeze_1d: bool | ct.Rules = True,
        name: str = "gpm",
    ):
        self.targets, self.record_fn, self.threshold = list(targets), record_fn, threshold
        self.num_samples, self.freeze_1d, self.name = num_samples, freeze_1d, name
        if not callable(threshold):
            n = 1 if np.ndim(threshold) == 0 else len(cast(Sequence[float], threshold))
            pj._gpm._check_threshold(threshold, n)

    def wrap_optimizer(self, optimizer):
        return optax.chain(optimizer, pj.gpm(self.targets, freeze_1d=self.freeze_1d))

    def end_task(self, state, ctx):
        x = ctx.train_batch(self.num_samples)["x"]
        reps = pj.gpm_representations(state.params, self.targets, self.record_fn(state.params, x))
        t = self.threshold(ctx.index) if callable(self.threshold) else self.threshold
        opt = pj.map_state(state.opt_state, pj.GPMState, lambda s: pj.gpm_update_memory(s, reps, t))
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
            state.opt_state, pj.CoSOState, lambda s: pj.coso_next_task(s, self.threshold)
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
            state.opt_state, pj.OSFTState, lambda s: pj.osft_begin_task(s, weights, ratios)
        )
        return state.replace(opt_state=opt)
