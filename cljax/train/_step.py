"""Step builders: a loss function and an optimizer become a jitted, donated train step."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from cljax.train._state import TrainState, _concrete
from cljax.tree import path_str

__all__ = ["NonFiniteError", "apply_step", "make_step", "raise_on_nonfinite"]

LossFn = Callable[..., Any]


class NonFiniteError(FloatingPointError):
    """Raised (outside jit) when a step produced non-finite values and the policy is 'raise'.

    Attributes:
      state: the state the failing step returned, when there is one: the update was
        skipped, so its parameters and optimizer state are those from before the step (and
        its ``step`` counts the failed one). A donating step has deleted the state it was
        given, so this is the state to go on from (e.g. after dropping the batch).
    """

    def __init__(self, message: str, *, state: Any = None):
        super().__init__(message)
        self.state = state


def raise_on_nonfinite(
    step_fn: Callable[[Any, Any], tuple[Any, dict[str, Any]]],
) -> Callable[[Any, Any], tuple[Any, dict[str, Any]]]:
    """Wraps ``step(state, batch) -> (state, metrics)`` to raise on a non-finite step.

    After each call, ``metrics["finite"]`` is read on the host (one sync per step); if it
    is false, :class:`NonFiniteError` names the step (``state.step`` of the returned state,
    less one) and carries the returned state. Called inside a trace (``jit``, ``scan``,
    ``vmap``), the wrapper cannot raise and returns the step's result as it is: the step
    then behaves as ``nonfinite="skip"`` (the update is skipped and counted in
    ``state.skipped``), and whoever compiles it adds the check (:func:`make_step` and
    :func:`cljax.sharding.sharded_step` do) or reads ``state.skipped``.

    Args:
      step_fn: a step whose metrics hold ``"finite"`` and whose state has ``step``, built
        with a policy that skips non-finite updates (``"skip"`` or ``"raise"``).

    Returns:
      The checked step, marked ``nonfinite = "raise"``; ``lower`` and ``trace`` are kept.
    """

    def checked(state: Any, batch: Any):
        new, metrics = step_fn(state, batch)
        finite = metrics["finite"]
        if isinstance(finite, jax.core.Tracer) or bool(finite):
            return new, metrics
        at = int(new.step) - 1
        raise NonFiniteError(
            f"non-finite loss, gradient or update at step {at} (update skipped; the unchanged "
            "state is this error's .state)",
            state=new,
        )

    for name in ("lower", "trace"):
        if hasattr(step_fn, name):
            setattr(checked, name, getattr(step_fn, name))
    checked.nonfinite = "raise"  # type: ignore[attr-defined]
    checked.__wrapped__ = step_fn  # type: ignore[attr-defined]
    return checked


def _donation_problem(state: Any) -> str | None:
    """Why a donating step cannot take ``state``: a deleted array, or one array held twice."""
    seen: dict[int, str] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not _concrete(x):
            continue
        where = path_str(path)
        if x.is_deleted():
            return (
                f"state leaf {where!r} was deleted: a step built with make_step(donate=True) "
                "donates the state it is given, so that state's arrays are gone after the "
                "call. Pass the state the step returned, not the one passed in; to keep an "
                "array (pretrained weights, an anchor) hold a copy of it (TrainState.create "
                "copies what it is given unless copy=False) or build the step with "
                "donate=False."
            )
        if id(x) in seen:
            return (
                f"state leaves {seen[id(x)]!r} and {where!r} are the same array, and a "
                "donated state cannot hold one buffer twice (e.g. methods['anchor'] set to "
                "state.params); give one of them its own copy (jnp.copy)."
            )
        seen[id(x)] = where
    return None


def _takes_key(loss_fn: LossFn) -> bool:
    """Whether ``loss_fn`` is ``loss_fn(params, batch, key)`` rather than ``(params, batch)``.

    Decided by binding three, then two positional arguments to its signature; a callable
    without a signature is given the key (the form every loss had before).

    Raises:
      TypeError: if the signature takes neither form.
    """
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return True
    for n in (3, 2):
        try:
            sig.bind(*range(n))
        except TypeError:
            continue
        return n == 3
    raise TypeError(
        f"make_step: {loss_fn=} must take (params, batch) or (params, batch, key); "
        f"its signature is {sig}"
    )


def _all_finite(tree: Any) -> jax.Array:
    """Whether every inexact leaf of ``tree`` is finite (a traced scalar bool)."""
    ok = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(ok)) if ok else jnp.asarray(True)


def keep_finite(
    state: TrainState, new: TrainState, finite: jax.Array
) -> tuple[TrainState, jax.Array]:
    """``new`` if ``finite`` and its parameters are finite, else ``state``'s parameters,
    optimizer and method states (with ``new``'s step and key); counts a rejected step in
    ``skipped``. Returns the state and the combined flag. Traceable."""
    finite = finite & _all_finite(new.params)  # a finite gradient can still overflow them
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
    new = new.replace(
        params=pick(new.params, state.params),
        opt_state=pick(new.opt_state, state.opt_state),
        methods=pick(new.methods, state.methods),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    return new, finite


def apply_step(
    state: TrainState,
    key: jax.Array,
    out: Any,
    grads: Any,
    *,
    has_aux: bool = False,
    nonfinite: Literal["apply", "skip", "raise"] = "raise",
    post_update: Callable[[TrainState], TrainState] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The second half of a :func:`make_step` step, for steps that compute their gradient
    elsewhere: apply ``grads``, then ``post_update``, store ``key`` (the state's next PRNG key),
    apply the non-finite policy and return ``(state, metrics)``.

    ``out`` is the loss, or ``(loss, aux)`` with ``has_aux``. Traceable; the ``"raise"``
    policy's host check is not here but in :func:`raise_on_nonfinite` (wrap the compiled
    step with it), so here ``"raise"`` (the default) behaves as ``"skip"``: a non-finite
    update is never applied.
    """
    loss, aux = out if has_aux else (out, {})
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(gnorm) & jnp.isfinite(loss)
    new = state.apply_gradients(grads)
    if post_update is not None:
        new = post_update(new)
    new = new.replace(key=key)
    if nonfinite != "apply":
        new, finite = keep_finite(state, new, finite)
    metrics = {"loss": loss, "grad_norm": gnorm, "finite": finite, **aux}
    return new, metrics


def make_step(
    loss_fn: LossFn,
    *,
    has_aux: bool = False,
    nonfinite: Literal["apply", "skip", "raise"] = "raise",
    post_update: Callable[[TrainState], TrainState] | None = None,
    jit: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``step(state, batch) -> (state, metrics)``.

    The step splits ``state.key``, computes ``loss_fn(params, batch, key)`` (or
    ``loss_fn(params, batch)``) and its gradient, applies ``state.tx`` and then
    ``post_update`` (e.g. an EMA update of a method state).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> loss`` or ``-> (loss, aux)`` with
        ``has_aux=True``; ``aux`` must be a dict of scalars, merged into the metrics. A
        loss that needs no randomness may be ``loss_fn(params, batch)``: the signature
        decides (a third positional parameter, or ``*args``, gets the key).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      nonfinite: what to do when the loss, the gradient or the updated parameters hold
        NaN/Inf (a huge learning rate overflows finite gradients). ``"raise"``
        (the default) leaves params, optimizer and method states unchanged and the step
        raises :class:`NonFiniteError` naming the step number, with the unchanged state
        on the error (one host sync per step; see :func:`raise_on_nonfinite`). With
        ``jit=False`` the step raises when called eagerly; traced inside another
        transform it cannot, and skips instead (``sharded_step`` adds the check back).
        ``"skip"`` leaves the states unchanged and counts the step in ``state.skipped``,
        with no host sync. ``"apply"`` applies the update whatever it holds.
      post_update: ``state -> state`` applied after the optimizer update, inside the jit.
      jit: compile the step.
      donate: donate the input state's buffers (only with ``jit``): they are reused for
        the new state and deleted, so keep using the returned state. A state that holds a
        deleted array or one array twice raises a ``ValueError`` naming the leaf.

    Returns:
      The step function. Its metrics hold ``loss``, ``grad_norm``, ``finite`` (the loss and
      the gradient are finite, and unless ``nonfinite="apply"`` the updated parameters
      too) and aux.

    Raises:
      ValueError: for an unknown ``nonfinite`` policy; from the step, for a state whose
        arrays were already donated (see ``donate``).
      NonFiniteError: from the step, with ``nonfinite="raise"``, on a non-finite loss or
        gradient.
      TypeError: if ``loss_fn`` takes neither ``(params, batch)`` nor ``(params, batch,
        key)``.
    """
    if nonfinite not in ("apply", "skip", "raise"):
        raise ValueError(f"{nonfinite=} must be one of 'apply', 'skip', 'raise'")
    takes_key = _takes_key(loss_fn)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def step(state: TrainState, batch: Any):
        key, sub = jax.random.split(state.key)
        args = (sub,) if takes_key else ()
        out, grads = grad_fn(state.params, batch, *args)
        return apply_step(
            state, key, out, grads, has_aux=has_aux, nonfinite=nonfinite, post_update=post_update
        )

    if jit:
        step = jax.jit(step, donate_argnums=(0,) if donate else ())
    if jit and donate:
        jitted = step

        def step(state: TrainState, batch: Any):
            try:
                return jitted(state, batch)
            except Exception as e:  # XLA's "Buffer has been deleted or donated", and others
                problem = _donation_problem(state)
                if problem is None:
                    raise
                raise ValueError(problem) from e

        step.lower = jitted.lower  # type: ignore[attr-defined]
        step.trace = jitted.trace  # type: ignore[attr-defined]

    return raise_on_nonfinite(step) if nonfinite == "raise" else step
