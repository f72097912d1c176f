"""Model merging in weight space: task vectors, task arithmetic, TIES, DARE, soups, WiSE-FT.

Every function is pure and jit-able on any pytree of arrays (a linen params dict, an
``nnx.State``), keeps the structure and dtypes of its inputs and accumulates in float32. T
task vectors are given as a Python list of trees or as one stacked tree (leading axis T).
Which leaves take part is data: path rules ``[(regex, bool), ...]`` (first match wins;
default: every floating leaf); excluded and integer leaves keep the pre-trained value.
"""

from cljax.merging._dare import dare
from cljax.merging._select import DEFAULT_GRID, select_scale
from cljax.merging._soups import average, greedy_soup, interpolate
from cljax.merging._task_vectors import apply, task_arithmetic, task_vector
from cljax.merging._ties import ties

__all__ = [
    "DEFAULT_GRID",
    "apply",
    "average",
    "dare",
    "greedy_soup",
    "interpolate",
    "select_scale",
    "task_arithmetic",
    "task_vector",
    "ties",
]
