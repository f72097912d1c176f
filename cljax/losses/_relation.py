"""Prototype-sample relation distillation (PRD): SupCon, prototype loss, relation distillation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cljax._checks import check_scalar

__all__ = ["prototype_loss", "relation_distillation", "supervised_contrastive_loss"]


def _normalize(x, axis=-1, eps=1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def supervised_contrastive_loss(
    features: jax.Array,
    labels: jax.Array | None = None,
    *,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> jax.Array:
    """Khosla et al.'s SupCon loss over ``N`` examples in ``V`` views (``contrast_mode="all"``).

    Every one of the ``N V`` embeddings is an anchor; its positives are the other embeddings
    with its label (its other views included), its contrast set every embedding but itself:
    ``-(T / T_base) mean_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )``,
    averaged over anchors. Without labels it is SimCLR's NT-Xent (positives: the other views).
    Embeddings are L2-normalised here (a no-op for normalised inputs). An anchor without
    positives (a single view of a label seen once) is left out of the average; the reference
    code would give NaN.

    Args:
      features: ``[N, V, D]`` embeddings (``V >= 1`` views per example).
      labels: optional ``[N]`` integer labels.
      temperature: T > 0 (the reference's default 0.07; PRD uses 0.1-0.3).
      base_temperature: ``T_base > 0``; the loss is scaled by ``T / T_base``.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: on non-positive temperatures or mismatched shapes.

    Example::

      z = jnp.stack([proj(f1), proj(f2)], axis=1)  # two augmented views
      loss = supervised_contrastive_loss(z, labels, temperature=0.1)

    References:
      Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu & Krishnan, "Supervised
      Contrastive Learning", NeurIPS 2020 (Eq. 2, L_out); https://github.com/HobbitLong/SupContrast.
    """
    name = "supervised_contrastive_loss"
    check_scalar(temperature, name="temperature", where=name, low=0.0, low_open=True)
    check_scalar(base_temperature, name="base_temperature", where=name, low=0.0, low_open=True)
    if jnp.ndim(features) != 3:
        raise ValueError(f"{name}: features {jnp.shape(features)} must be [N, V, D]")
    n, v, _ = jnp.shape(features)
    if labels is not None and jnp.shape(labels) != (n,):
        raise ValueError(f"{name}: labels {jnp.shape(labels)} must be [{n}]")
    z = _normalize(jnp.asarray(features, jnp.float32))
    z = jnp.swapaxes(z, 0, 1).reshape(v * n, -1)  # view-major, as the reference's torch.cat
    ids = jnp.tile(jnp.arange(n) if labels is None else jnp.asarray(labels), v)
    logits = z @ z.T / temperature
    eye = jnp.eye(v * n, dtype=bool)
    logits = jnp.where(eye, -jnp.inf, logits)
    log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    pos = (ids[:, None] == ids[None, :]) & ~eye
    n_pos = jnp.sum(pos, axis=1)
    mean_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / jnp.maximum(n_pos, 1)
    per_anchor = -(temperature / base_temperature) * mean_pos
    has = n_pos > 0
    return jnp.sum(jnp.where(has, per_anchor, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def prototype_loss(features: jax.Array, labels: jax.Array, prototypes: jax.Array) -> jax.Array:
    """``mean_i (1 - cos(stop_gradient(f_i), w_{y_i}))``: trains prototypes, not the encoder.

    PRD learns one prototype per class by pulling it towards the (frozen) features of its
    class; the features see no gradient from this loss, so the prototypes follow the
    representation learnt by the contrastive loss instead of shaping it.

    Args:
      features: ``[N, D]`` encoder features.
      labels: ``[N]`` integer labels in ``[0, C)``, indices into ``prototypes`` (shift a task's
        labels to its own prototypes first).
      prototypes: ``[C, D]`` prototypes (not necessarily normalised).

    Returns:
      A float32 scalar.

    Raises:
      ValueError: on mismatched shapes.

    Example::

      loss = supcon + 4.0 * prototype_loss(feats, y - first_class, params["prototypes"])

    References:
      Asadi, Davari, Mudur, Aljundi & Belilovsky, "Prototype-Sample Relation Distillation:
      Towards Replay-Free Continual Learning", ICML 2023 (Eq. 4);
      https://github.com/naderAsadi/Probing-Continual-Learning (``methods/repe.py``,
      ``linear_loss``).
    """
    name = "prototype_loss"
    if jnp.ndim(features) != 2 or jnp.ndim(prototypes) != 2:
        raise ValueError(
            f"{name}: features {jnp.shape(features)} and prototypes {jnp.shape(prototypes)} "
            "must be [N, D] and [C, D]"
        )
    if jnp.shape(features)[1] != jnp.shape(prototypes)[1]:
        raise ValueError(
            f"{name}: features {jnp.shape(features)} and prototypes {jnp.shape(prototypes)} "
            "differ in feature size"
        )
    if jnp.shape(labels) != jnp.shape(features)[:1]:
        raise ValueError(f"{name}: labels {jnp.shape(labels)} must be [{jnp.shape(features)[0]}]")
    f = _normalize(jax.lax.stop_gradient(jnp.asarray(features, jnp.float32)))
    w = _normalize(jnp.asarray(prototypes, jnp.float32))
    cos = jnp.sum(f * w[jnp.asarray(labels)], axis=-1)
    return jnp.mean(1.0 - cos)


def relation_distillation(
    student_features: jax.Array,
    teacher_features: jax.Array,
    student_prototypes: jax.Array,
    teacher_prototypes: jax.Array,
    *,
    temperature: float = 1.0,
    where: jax.Array | None = None,
) -> jax.Array:
    """KL between each sample's softmax over old prototypes, previous model vs current model.

    For every sample, the scores ``<f, w_c> / ||w_c||`` against the old classes' prototypes
    are turned into a softmax over those prototypes (``/ temperature``), once with the
    previous model's features and prototypes (teacher, no gradient) and once with the current
    model's features and its current copies of the old prototypes (student). The loss is
    ``KL(teacher || student)`` averaged over samples, so the old prototypes may move with the
    representation as long as their relations to the samples are kept. Prototypes may carry
    leading group axes ``[..., P, D]`` (one group per old task, as the official code keeps one
    head a task): the softmax then runs within each group and the groups' losses are summed.

    Which details come from where: the official code (``methods/repe.py``) gives the score
    (features not normalised, prototypes divided by their norm), the softmax over each old
    task's prototypes (not over the samples), the sum over old tasks and the default
    temperature 1. It minimises the cross-entropy ``-sum q log p``, which differs from this
    KL by the teacher's entropy: the gradients are the same.

    Args:
      student_features: ``[N, D]`` current encoder features.
      teacher_features: ``[N, D]`` the previous encoder's features of the same inputs.
      student_prototypes: ``[..., P, D]`` current prototypes of the old classes.
      teacher_prototypes: ``[..., P, D]`` the previous model's prototypes of the old classes.
      temperature: T > 0.
      where: optional ``[..., P]`` bool mask of the prototypes that take part: the softmax
        of each group runs over its selected prototypes only, and a group with none
        selected adds 0. It lets one fixed-shape call cover a growing set of old classes
        inside a jitted step (the groups of tasks not seen yet masked out).

    Returns:
      A float32 scalar.

    Raises:
      ValueError: on a non-positive temperature or mismatched shapes.

    Example::

      loss = supcon + 4.0 * proto + 4.0 * relation_distillation(
          feats, old_feats, params["prototypes"][old], old_params["prototypes"][old])

    References:
      Asadi, Davari, Mudur, Aljundi & Belilovsky, "Prototype-Sample Relation Distillation:
      Towards Replay-Free Continual Learning", ICML 2023 (Eq. 5-6);
      https://github.com/naderAsadi/Probing-Continual-Learning (``methods/repe.py``,
      ``relation_distillation_loss``).
    """
    name = "relation_distillation"
    check_scalar(temperature, name="temperature", where=name, low=0.0, low_open=True)
    fs, ft = jnp.shape(student_features), jnp.shape(teacher_features)
    ps, pt = jnp.shape(student_prototypes), jnp.shape(teacher_prototypes)
    if len(fs) != 2 or fs != ft:
        raise ValueError(f"{name}: student {fs} and teacher {ft} features must be one [N, D]")
    if len(ps) < 2 or ps != pt or ps[-1] != fs[1]:
        raise ValueError(
            f"{name}: student {ps} and teacher {pt} prototypes must be one [..., P, {fs[1]}]"
        )

    def scores(f, w):
        w = _normalize(jnp.asarray(w, jnp.float32))
        return jnp.einsum("nd,...pd->...np", jnp.asarray(f, jnp.float32), w) / temperature

    if where is not None and jnp.shape(where) != ps[:-1]:
        raise ValueError(
            f"{name}: where {jnp.shape(where)} must be {ps[:-1]} (prototypes' [..., P])"
        )
    t = jax.lax.stop_gradient(scores(teacher_features, teacher_prototypes))
    s = scores(student_features, student_prototypes)
    mask = jnp.ones(ps[:-1], bool) if where is None else jnp.asarray(where, bool)
    sel = jnp.expand_dims(mask, -2)  # [..., 1, P], broadcast over samples
    # a large finite negative (not -inf): an all-masked group stays finite, then zeroed
    t, s = jnp.where(sel, t, -1e9), jnp.where(sel, s, -1e9)
    logq = jax.nn.log_softmax(t, axis=-1)
    q = jnp.where(sel, jnp.exp(logq), 0.0)
    kl = jnp.sum(jnp.where(q > 0, q * (logq - jax.nn.log_softmax(s, axis=-1)), 0.0), axis=-1)
    kl = jnp.where(jnp.any(sel, axis=-1), kl, 0.0)
    # kl: [..., N]; mean over samples, sum over groups
    return jnp.sum(jnp.mean(kl, axis=-1))
