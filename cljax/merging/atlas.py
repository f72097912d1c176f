"""aTLAS: task vectors composed with learned anisotropic block-wise coefficients.

Public namespace of :mod:`cljax.merging._atlas`::

    from cljax.merging import atlas

    spec = atlas.blocks(params, groups=atlas.CLIP_QKV_GROUPS)  # CLIP: q, k, v tied per layer
    coefs = atlas.init(params, task_vectors, spec)          # zeros: starts at θ0
    theta = atlas.compose(params, task_vectors, coefs, spec)
    res = atlas.fit(atlas.supervised_objective(logits_fn), params, task_vectors,
                    task.batch_at, epochs=10, steps_per_epoch=8, spec=spec,
                    evaluate=val_metrics)

References:
  Zhang, Fournier, Gould et al., "Knowledge Composition using Task Vectors with Learned
  Anisotropic Scaling", NeurIPS 2024 (arXiv:2407.02880).
"""

from cljax.merging._atlas import (
    CLIP_QKV_GROUPS,
    VIT_QKV_GROUPS,
    Blocks,
    FitResult,
    blocks,
    compose,
    default_optimizer,
    entropy_objective,
    few_shot_optimizer,
    fit,
    init,
    negation_score,
    partition_masks,
    pseudo_label_objective,
    supervised_objective,
    task_addition_objective,
    task_negation_objective,
)

__all__ = [
    "CLIP_QKV_GROUPS",
    "VIT_QKV_GROUPS",
    "Blocks",
    "FitResult",
    "blocks",
    "compose",
    "default_optimizer",
    "entropy_objective",
    "few_shot_optimizer",
    "fit",
    "init",
    "negation_score",
    "partition_masks",
    "pseudo_label_objective",
    "supervised_objective",
    "task_addition_objective",
    "task_negation_objective",
]
