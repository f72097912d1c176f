"""Model soups and WiSE-FT interpolation (Wortsman et al., 2022)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from cljax import tree as ct
from cljax.merging import _common

__all__ = ["average", "greedy_soup", "interpolate"]


def average(
    trees: Sequence[ct.Params] | ct.Params,
    weights: ArrayLike | None = None,
    *,
    rules: ct.Rules | None = None,
    check_finite: bool = False,
):
    """Uniform or weighted average of T models (a uniform soup), in float32.

    ``Σ_t w_t θ_t / Σ_t w_t``; the weights are normalised by their sum, so any positive
    weights (counts, softmax outputs) work, and they may be traced (learned soups).

    Args:
      trees: T models, a list of trees or one stacked tree (leading axis T).
      weights: optional ``(T,)`` weights; ``None`` is the uniform soup.
      rules: optional path rules ``[(regex, bool), ...]``; excluded and integer leaves keep
        the value of the first tree.
      check_finite: raise a ``ValueError`` if an input or the result holds NaN/Inf (needs
        concrete arrays: not under jit).

    Returns:
      A tree with the structure and dtypes of one model.

    Raises:
      ValueError: on an empty list, mismatched trees, weights of the wrong shape, and
        (unless traced) weights that are not finite reals or sum to 0; with
        ``check_finite`` on NaN/Inf.

    Example:
      >>> soup = average([theta_a, theta_b, theta_c])

    References:
      Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
      accuracy without increasing inference time", ICML 2022.
    """
    reference = _common.reference_of(trees, name="trees")
    ts = _common.read_task_set(trees, reference, name="trees", ref_name="trees[0]")
    if weights is not None and tuple(np.shape(weights)) != (ts.num_tasks,):
        raise ValueError(
            f"average: weights of shape {tuple(np.shape(weights))} must have shape "
            f"({ts.num_tasks},), one per tree"
        )
    if weights is not None and not isinstance(weights, jax.core.Tracer):
        w = np.asarray(weights)
        if w.dtype == bool or not (
            np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)
        ):
            raise ValueError(f"average: weights={weights!r} must be real numbers")
        if not np.isfinite(w).all():
            raise ValueError(f"average: weights={weights!r} must be finite")
        if float(np.sum(w, dtype=np.float64)) == 0.0:
            raise ValueError(f"average: weights={weights!r} sum to 0; they are normalised by it")
    if check_finite:
        _common.check_finite_trees("average", trees=trees)
    mask = tuple(_common.participating(reference, rules))
    out = _average_core(ts.leaves, weights, mask=mask, num_tasks=ts.num_tasks)
    out = jax.tree.unflatten(jax.tree.structure(reference), out)
    if check_finite:
        _common.check_finite_trees("average", result=out)
    return out


@functools.partial(jax.jit, static_argnames=("mask", "num_tasks"))
def _average_core(leaves, weights, *, mask, num_tasks):
    ts = _common.TaskSet(leaves, num_tasks)
    out = []
    for i, m in enumerate(mask):
        xs = ts.slices(i)
        if not m:
            out.append(xs[0])
        elif weights is None:
            out.append((_common.sum_slices(xs) / num_tasks).astype(xs[0].dtype))
        else:
            w = jnp.asarray(weights, _common.accum(xs[0]).dtype)
            w = w / jnp.sum(w)
            total = _common.sum_slices([w[t] * _common.accum(x) for t, x in enumerate(xs)])
            out.append(total.astype(xs[0].dtype))
    return out


def interpolate(a: ct.Params, b: ct.Params, alpha: ArrayLike, *, rules: ct.Rules | None = None):
    """Linear interpolation ``(1 − α)·a + α·b`` in float32 (WiSE-FT; α = 0 gives ``a``).

    Args:
      a: the zero-shot (pre-trained) model θ_0.
      b: the fine-tuned model θ_1, same structure and shapes.
      alpha: the mixing weight on ``b``; WiSE-FT's no-tuning default is 0.5. May be traced.
      rules: optional path rules ``[(regex, bool), ...]``; excluded and integer leaves keep
        the value of ``a`` (interpolate the backbone only when ``b`` has a new head).

    Returns:
      A tree with the structure and dtypes of ``a``.

    Raises:
      ValueError: if the trees differ in structure or shape (first path named), or
        ``alpha`` is not a finite real scalar (checked unless traced).

    Example:
      >>> robust = interpolate(theta_zeroshot, theta_finetuned, 0.5)

    References:
      Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022.
    """
    _common.check_scalar(alpha, name="alpha", where="interpolate")
    ct.check_same_structure(a, b, names=("a", "b"))
    mask = _common.participating(a, rules)
    la, treedef = jax.tree.flatten(a)
    lb = jax.tree.leaves(b)
    out = [
        ((1 - alpha) * _common.accum(x) + alpha * _common.accum(y)).astype(x.dtype) if m else x
        for x, y, m in zip(la, lb, mask, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def greedy_soup(
    candidates: Sequence[ct.Params] | ct.Params,
    evaluate: Callable[[ct.Params], float],
) -> tuple[ct.Params, list[int], np.ndarray]:
    """Greedy soup: add models in order of held-out score while the soup strictly improves.

    Every candidate is scored with ``evaluate`` (higher is better, on held-out data, never
    test). Candidates are visited by descending score (stable order on ties). The soup
    starts as the best candidate; each next candidate is tried as the uniform average of the
    accepted models plus it, and accepted iff its score is **strictly** greater than the
    current soup's. One pass, no revisiting. The running sum is kept in float32.

    Args:
      candidates: N models, a list of trees or a stacked tree (leading axis N).
      evaluate: ``tree -> float`` held-out score; called ``2N - 1`` times.

    Returns:
      ``(soup, selected, scores)``: the soup (structure and dtypes of a candidate), the
      indices of the accepted candidates in the order they were added (the best first), and
      the ``(N,)`` individual scores in candidate order.

    Raises:
      ValueError: on an empty list or mismatched candidates.

    Example:
      >>> soup, selected, scores = greedy_soup(models, lambda p: val_accuracy(p))

    References:
      Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
      accuracy without increasing inference time", ICML 2022.
    """
    reference = _common.reference_of(candidates, name="candidates")
    _common.read_task_set(candidates, reference, name="candidates", ref_name="candidates[0]")
    models = list(candidates) if isinstance(candidates, list | tuple) else ct.unstack(candidates)
    scores = np.array([float(evaluate(m)) for m in models])
    order = np.argsort(-scores, kind="stable")
    first = int(order[0])
    selected = [first]
    soup, total, best = models[first], ct.to_accum(models[first]), scores[first]
    for i in (int(j) for j in order[1:]):
        trial_total = _add(total, models[i])
        trial = _mean_like(trial_total, len(selected) + 1, models[first])
        score = float(evaluate(trial))
        if score > best:
            soup, total, best = trial, trial_total, score
            selected.append(i)
    return soup, selected, scores


@jax.jit
def _add(total, tree):
    return jax.tree.map(lambda s, x: s + _common.accum(x) if ct.is_float(x) else s, total, tree)


@jax.jit
def _mean_like(total, n, like):
    return jax.tree.map(lambda s, x: (s / n).astype(x.dtype) if ct.is_float(x) else x, total, like)
