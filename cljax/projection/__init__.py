"""Gradient-projection subspaces for continual learning: GPM, CoSO, OSFT.

Each method is an optax transform (a factory returning
``optax.GradientTransformationExtraArgs`` with a ``NamedTuple`` state) applied to the
**final update**, after the optimiser, so its constraint holds exactly under Adam
(see each method's References), plus pure between-task hooks ``(state, data) -> state``. Hooks reach their
sub-state inside an ``optax.chain`` with :func:`map_state`.

Which side each method protects, for Flax ``[in, out]`` kernels:

* GPM: input side (left), from layer-input activations;
* CoSO: output side (right), from gradients;
* OSFT: both sides, from the weights' own SVD.
"""

from cljax.projection._common import find_state, map_state, select_targets
from cljax.projection._coso import (
    CoSOState,
    coso,
    coso_next_task,
    frequent_directions_update,
    randomized_range,
)
from cljax.projection._gpm import (
    GPMState,
    conv_patches,
    gpm,
    gpm_next_task,
    gpm_representations,
    record_layer_inputs,
)
from cljax.projection._osft import (
    OSFTState,
    adaptive_ratios,
    io_cosine_similarity,
    osft,
    osft_next_task,
    osft_ranks,
    rising_ratio,
    target_leaves,
)

__all__ = [
    "CoSOState",
    "GPMState",
    "OSFTState",
    "adaptive_ratios",
    "conv_patches",
    "coso",
    "coso_next_task",
    "find_state",
    "frequent_directions_update",
    "gpm",
    "gpm_representations",
    "gpm_next_task",
    "io_cosine_similarity",
    "map_state",
    "osft",
    "osft_next_task",
    "osft_ranks",
    "randomized_range",
    "record_layer_inputs",
    "rising_ratio",
    "select_targets",
    "target_leaves",
]
