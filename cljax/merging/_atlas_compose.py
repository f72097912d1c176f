"""aTLAS composition: θ_b = θ0_b + Σ_t Λ[t, b] · τ_{t, b} for every block b.

The composition is the weighted sum of :func:`cljax.kernels.weighted_sum` with one
coefficient per (task vector, block) broadcast to the block's leaves (per partition group
for aTLAS×K). The gradient of a loss with respect to Λ is, by the chain rule,
``dL/dΛ[t, b] = <dL/dθ_b, τ_{t, b}>``: the op's ``jax.custom_vjp`` computes these T·B dot
products (:func:`cljax.kernels.block_dots`) from the one cotangent ``dL/dθ``, so a training
step costs one forward and one backward pass of the model plus two passes over the stored
task vectors, whatever T is.

Coefficients are a nested dict keyed by the ``/``-split block names. With the default
blocks the names are the parameter paths, so for dict parameters (Flax linen) the
coefficient tree has exactly the parameters' structure, each leaf of shape ``[T]``
(``[T, K]`` for partitioned blocks).

References:
  Zhang, Fournier, Gould et al., "Knowledge Composition using Task Vectors with Learned
  Anisotropic Scaling", NeurIPS 2024 (arXiv:2407.02880).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cljax import kernels
from cljax import tree as ct
from cljax.merging._atlas_blocks import Blocks, _check_spec, blocks, partition_masks

__all__ = ["compose", "init"]

Params = ct.Params
PyTree = ct.PyTree


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        *head, last = name.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def _flat_coefficients(coefficients: PyTree) -> dict[str, Any]:
    return dict(ct.leaves_with_paths(coefficients))


def init(
    pretrained: Params,
    task_vectors: Sequence[Params] | Params,
    spec: Blocks | None = None,
    *,
    dtype: Any = jnp.float32,
) -> dict:
    """Zero coefficients: composition starts exactly at the pretrained model.

    Args:
      pretrained: θ0.
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees.
      spec: the block layout (default: one block per floating-point leaf).
      dtype: coefficient dtype.

    Returns:
      A nested dict keyed by the ``/``-split block names, each leaf ``zeros([T])`` or
      ``zeros([T, K])``. With default blocks on dict parameters it has the parameters'
      structure.

    Raises:
      ValueError: if the task vectors do not match the parameters.

    Example:
      >>> coefs = init(params, [tv_a, tv_b])          # {"dense": {"kernel": (2,), ...}}
      >>> theta = compose(params, [tv_a, tv_b], coefs)  # == params

    References:
      aTLAS (NeurIPS 2024): coefficients are initialised to zero.
    """
    spec = blocks(pretrained) if spec is None else spec
    _check_spec(pretrained, spec)
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    ct.check_same_structure(pretrained, tvs, names=("pretrained", "task_vectors"), b_leading=(t,))
    return _nest({n: jnp.zeros(spec.coefficient_shape(n, t), dtype) for n in spec.names})


def _check_finite_coefficients(flat: dict[str, Any]) -> None:
    """Concrete coefficients (an eager call) must be finite: a NaN coefficient makes its
    block NaN. Traced ones (inside a step) are the step's to check."""
    if any(isinstance(v, jax.core.Tracer) for v in flat.values()):
        return
    ok = jax.device_get({n: jnp.all(jnp.isfinite(v)) for n, v in flat.items()})
    bad = [n for n, good in ok.items() if not good]
    if bad:
        raise ValueError(f"coefficients[{bad[0]!r}] holds NaN or Inf")


def compose(
    pretrained: Params,
    task_vectors: Sequence[Params] | Params,
    coefficients: PyTree,
    spec: Blocks | None = None,
    *,
    masks: Sequence[Any] | None = None,
    implementation: str | None = None,
) -> Params:
    """Composes θ_b = θ0_b + Σ_t Λ[t, b] · τ_{t, b} for every block b.

    Pure and jit-able. Task vectors may be stored in bfloat16/float16; the sum is
    accumulated in float32 (float64 when θ0 or Λ is float64) and cast to the dtype of each
    pretrained leaf. Leaves that are not composed come back unchanged.

    Gradients (``jax.custom_vjp``): the cotangent of Λ[t, b] is ``<dL/dθ_b, τ_{t, b}>``
    (summed over a partition group for ``[T, K]`` blocks), computed leaf by leaf from the
    one cotangent ``dL/dθ``; no T-fold activations or parameter copies. The cotangents of
    θ0 (``dL/dθ``) and of the task vectors (``Λ[t]·dL/dθ``) are exact too, and are only
    computed when those inputs are differentiated (``symbolic_zeros``), so a step that
    trains Λ alone pays nothing for them.

    Args:
      pretrained: θ0, any pytree of arrays.
      task_vectors: T task vectors, stacked (leading axis T) or a list of trees of the
        pretrained structure.
      coefficients: the tree returned by :func:`init` (nested dict of block names).
      spec: the block layout the coefficients were made for (default: one block per
        floating-point leaf, no partitions).
      masks: for partitioned layouts, the output of :func:`partition_masks` (computed here
        when omitted; pass it explicitly under ``jit`` for large models, or the masks become
        constants of the compiled program).
      implementation: which backend of :func:`cljax.kernels.weighted_sum` runs: ``None``
        (the Pallas kernels on GPU/TPU, a fused forward whose coefficient gradient is the
        one-pass ``block_dots``; the XLA reference on the CPU), ``"xla"`` or ``"pallas"``.

    Returns:
      The composed parameters, with the structure and dtypes of ``pretrained``.

    Raises:
      ValueError: if the task vectors or the coefficients do not match (naming the first
        differing path or block), the layout was built for another tree, or (concrete
        coefficients only: an eager call) a coefficient is NaN or Inf.

    Example:
      >>> spec = blocks(params)
      >>> coefs = init(params, tvs, spec)
      >>> loss = lambda c: loss_fn(compose(params, tvs, c, spec), batch)
      >>> grads = jax.grad(loss)(coefs)   # <dL/dθ_b, τ_t,b> for every t, b

    References:
      aTLAS (NeurIPS 2024), Eq. (2) and ``src/composition.py``.
    """
    spec = blocks(pretrained) if spec is None else spec
    leaves = _check_spec(pretrained, spec)
    tvs = ct.as_stacked(task_vectors)
    t = ct.num_stacked(tvs)
    ct.check_same_structure(pretrained, tvs, names=("pretrained", "task_vectors"), b_leading=(t,))
    flat = _flat_coefficients(coefficients)
    for n in spec.names:
        if n not in flat:
            raise ValueError(f"coefficients has no entry for block {n!r}")
        want = spec.coefficient_shape(n, t)
        if tuple(np.shape(flat[n])) != want:
            raise ValueError(
                f"coefficients[{n!r}] has shape {tuple(np.shape(flat[n]))}, expected {want} "
                f"(T={t} task vectors" + (f", K={spec.partitions})" if want[1:] else ")")
            )
        if not ct.is_float(flat[n]):
            raise ValueError(f"coefficients[{n!r}] must be floating point, got {flat[n].dtype}")
    extra = [n for n in flat if n not in set(spec.names)]
    if extra:
        raise ValueError(f"coefficients has an entry {extra[0]!r} that is no block of the layout")
    _check_finite_coefficients(flat)
    if any(spec.partitioned):
        if masks is None:
            masks = partition_masks(pretrained, spec)
        masks = list(masks)
        if len(masks) != len(leaves):
            raise ValueError(f"masks has {len(masks)} entries for {len(leaves)} leaves")
    else:
        masks = [None] * len(leaves)  # read for partitioned blocks only
    tv_leaves = jax.tree.leaves(tvs)
    impl = kernels.resolve_implementation(implementation, where="atlas.compose")
    # Every composed leaf through the one weighted-sum op (its custom VJP gives Λ's
    # cotangent as block_dots): a few kernels for the whole model on GPU/TPU.
    idx = [i for i, b in enumerate(spec.block_of) if b >= 0]
    ys = kernels.weighted_sum_leaves(
        [jnp.asarray(leaves[i][1]) for i in idx],
        [tv_leaves[i] for i in idx],
        [flat[spec.names[spec.block_of[i]]] for i in idx],
        [jnp.asarray(masks[i]) if spec.partitioned[spec.block_of[i]] else None for i in idx],
        implementation=impl,
    )
    out = [x for _, x in leaves]
    for i, y in zip(idx, ys, strict=True):
        out[i] = y
    return jax.tree.unflatten(jax.tree.structure(pretrained), out)
