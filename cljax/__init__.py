"""cljax: multi-task learning, continual learning and model merging as pure JAX pytree transforms.

Subpackages follow the three places of a training step where a method acts:

* weights (pure functions from parameter pytrees to a parameter pytree):
  :mod:`cljax.merging`, :mod:`cljax.averaging`
* gradients (optax transforms, or gradient functions built from a loss):
  :mod:`cljax.mtl`, :mod:`cljax.projection`
* losses (terms added to the task loss): :mod:`cljax.losses`

and the substrate: :mod:`cljax.tree`, :mod:`cljax.train`, :mod:`cljax.data`,
:mod:`cljax.models`, :mod:`cljax.checkpoint`, :mod:`cljax.kernels`. Every stateful method --
a projection, an average, a loss weighting, a continual method -- follows one protocol,
optax's ``(init, update)`` pair (:mod:`cljax.stateful`).
"""

__version__ = "0.1.0.dev0"

from cljax import data, train, tree  # noqa: E402

__all__ = ["data", "train", "tree", "__version__"]
