"""DANN: a gradient reversal layer, its adaptation schedule and the domain classifier loss."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from cljax._checks import check_int, check_scalar

__all__ = ["dann_schedule", "domain_adversarial_loss", "grad_reverse"]


@jax.custom_vjp
def _reverse(x, scale):
    return x


def _reverse_fwd(x, scale):
    return x, scale


def _reverse_bwd(scale, g):
    flip = lambda c: (-jnp.asarray(scale, jnp.float32) * c.astype(jnp.float32)).astype(c.dtype)
    return jax.tree.map(flip, g), jnp.zeros_like(scale)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def grad_reverse(x, scale: jax.typing.ArrayLike = 1.0):
    """Identity forward; multiplies the incoming gradient by ``-scale`` on the way back.

    Ganin et al.'s gradient reversal layer: put it between the feature extractor and the
    domain classifier, and one minimisation of ``task_loss + domain_loss`` trains the domain
    classifier to tell the domains apart while it trains the features to confuse it (the
    saddle point of the paper's objective). ``scale`` is the paper's ``lambda_p``; it may be a
    traced scalar (a schedule evaluated on the step inside ``jit``). ``scale = 0`` stops the
    gradient. No gradient flows to ``scale`` itself.

    Args:
      x: an array or a pytree of arrays.
      scale: a scalar, Python or traced; the reversed gradient is ``-scale * g``.

    Returns:
      ``x`` unchanged.

    Raises:
      ValueError: if ``scale`` is not a scalar, or is a concrete NaN or infinity.

    Example::

      feats = encoder(params["enc"], x)
      domain_logits = domain_head(params["dom"], grad_reverse(feats, dann_schedule(n)(step)))

    References:
      Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand & Lempitsky,
      "Domain-Adversarial Training of Neural Networks", JMLR 17(59), 2016 (Section 4.2).
    """
    if jnp.ndim(scale) != 0:
        raise ValueError(f"grad_reverse: scale must be a scalar, got shape {jnp.shape(scale)}")
    check_scalar(scale, name="scale", where="grad_reverse")
    return _reverse(x, jnp.asarray(scale, jnp.float32))


def dann_schedule(total_steps: int, *, gamma: float = 10.0) -> Callable[[jax.Array], jax.Array]:
    """The paper's adaptation factor ``lambda_p = 2 / (1 + exp(-gamma * p)) - 1``, ``p = step / total``.

    ``lambda_p`` rises from 0 to almost 1 (0.9999 at ``p = 1`` for ``gamma = 10``), which keeps
    the domain classifier's noisy early signal away from the features. The step is clipped to
    ``[0, total_steps]``. Like an optax schedule, the result is a function of the step that
    works on Python ints and on traced arrays alike.

    Args:
      total_steps: the number of training steps ``p`` is measured against.
      gamma: the steepness (the paper uses 10 in all experiments).

    Returns:
      ``schedule(step) -> float32 scalar``.

    Raises:
      ValueError: on a ``total_steps`` that is not a positive int, or a ``gamma`` that is not
        positive and finite.

    Example::

      lam = dann_schedule(10_000)
      feats_for_domain = grad_reverse(feats, lam(state.step))

    References:
      Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016 (Section 5.2.2).
    """
    total_steps = check_int(total_steps, name="total_steps", where="dann_schedule", low=1)
    check_scalar(gamma, name="gamma", where="dann_schedule", low=0.0, low_open=True)
    gamma = float(gamma)

    def schedule(step):
        p = jnp.clip(jnp.asarray(step, jnp.float32) / float(total_steps), 0.0, 1.0)
        return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0

    return schedule


def domain_adversarial_loss(
    domain_logits_source: jax.Array, domain_logits_target: jax.Array
) -> jax.Array:
    """Binary cross-entropy of the domain classifier: source is label 0, target label 1.

    Each domain's loss is averaged over its examples and the two means are averaged, so the
    loss is the plain mean over all examples when both batches have the same size and does
    not tilt towards the larger batch otherwise. (The paper sums the two means; that is this
    loss times 2, a factor absorbed by ``lambda``.) Feed it logits that went through
    :func:`grad_reverse` to train the features adversarially.

    Args:
      domain_logits_source: ``[N]`` or ``[N, 1]`` logits of ``P(target | x)`` on source inputs.
      domain_logits_target: ``[M]`` or ``[M, 1]`` logits on target inputs.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: if a batch is empty or its logits are not ``[N]`` or ``[N, 1]``.

    Example::

      d_s = domain_head(grad_reverse(f_s, lam))
      d_t = domain_head(grad_reverse(f_t, lam))
      loss = ce(label_head(f_s), y_s) + domain_adversarial_loss(d_s, d_t)

    References:
      Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016 (Eq. 9-10).
    """
    out = []
    for name, z, positive in (
        ("domain_logits_source", domain_logits_source, False),
        ("domain_logits_target", domain_logits_target, True),
    ):
        shape = jnp.shape(z)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] == 0:
            raise ValueError(
                f"domain_adversarial_loss: {name} has shape {shape}; need [N] or [N, 1]"
            )
        z = jnp.asarray(z).astype(jnp.float32).reshape(-1)
        # -log sigmoid(z) for label 1, -log(1 - sigmoid(z)) = softplus(z) for label 0
        out.append(jnp.mean(jax.nn.softplus(-z if positive else z)))
    return 0.5 * (out[0] + out[1])
