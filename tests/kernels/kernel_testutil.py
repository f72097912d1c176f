"""Shared inputs of the kernel tests (imported by the test modules beside it)."""

import jax
import numpy as np
import pytest

from cljax.kernels import BlockSizes

# Interpret mode costs milliseconds per grid step: few, large blocks on the CPU.
# Leaves under 1024 entries take the packed XLA path, the others share one kernel.
INTERPRET_BLOCKS = BlockSizes(rows=64, min_rows=64, xla_below=1024)

# Two small leaves packed together for XLA ("a", "b"; also under the GPU default xla_below)
# and two leaves sharing one kernel: "v" (33·256 entries: 66 rows, padded to 2 blocks of 64)
# and "w" (305 rows -> padded to 5 blocks of 64). (Leaves whose size is a multiple of the
# block need no padding: tested in test_dispatch.py.) Keys are in flattening order, so
# per-leaf lists (group ids) line up with ``SHAPES``.
SHAPES = {"a": (3, 5), "b": (7,), "v": (33, 256), "w": (300, 130)}

TOL = {np.dtype("float32"): 1e-5, np.dtype(jax.numpy.bfloat16): 2e-2}


def where_params():
    """Run each kernel test in interpret mode on the CPU, and natively on a GPU when present."""
    return [
        pytest.param(INTERPRET_BLOCKS, id="interpret"),
        pytest.param(None, id="gpu", marks=pytest.mark.gpu),
    ]


def tree(rng, lead=(), dtype=np.float32, scale=1.0):
    """A dict of random leaves of SHAPES (with leading axes ``lead``), never zeros."""
    return {
        k: jax.numpy.asarray(scale * rng.normal(size=lead + s) + 0.01, dtype)
        for k, s in SHAPES.items()
    }
