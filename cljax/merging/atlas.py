"""aTLAS: task vectors composed with learned anisotropic block-wise coefficients.

Public namespace of the aTLAS modules: the block layout (:mod:`cljax.merging._atlas_blocks`),
the composition op (:mod:`cljax.merging._atlas_compose`, the weighted sum of
:func:`cljax.kernels.weighted_sum`), the objectives and optimiser presets
(:mod:`cljax.merging._atlas_objectives`) and the resumable trainer
(:mod:`cljax.merging._atlas_fit`)::

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

from cljax.merging._atlas_blocks import (
    CLIP_QKV_GROUPS,
    VIT_QKV_GROUPS,
    Blocks,
    blocks,
    partition_masks,
)
from cljax.merging._atlas_compose import compose, init
from cljax.merging._atlas_fit import FitResult, fit
from cljax.merging._atlas_objectives import (
    default_optimizer,
    entropy_objective,
    few_shot_optimizer,
    negation_score,
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
