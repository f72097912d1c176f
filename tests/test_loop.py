"""Tests of cljax._loop, the resumable step loop of the continual runner and atlas.fit.

The loops themselves are tested end to end (interrupted and resumed runs, checkpoints of
another run refused with the run's message, damaged checkpoints moved aside) in
tests/continual/test_runner*.py, tests/merging/test_atlas_resume.py and tests/test_resume.py;
these tests pin the shared pieces that need no checkpoint on disk.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from cljax import _loop
from cljax.checkpoint import CheckpointManager
from cljax.train import NonFiniteError


def test_check_every():
    _loop.check_every(None, None)
    _loop.check_every(3, "folder")
    _loop.check_every(np.int64(3), "folder")
    for bad in (0, -2, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"fit: checkpoint_every=.* must be a positive int"):
            _loop.check_every(bad, "folder", where="fit: ")
    with pytest.raises(ValueError, match=r"^checkpoint_every=4 needs a checkpoint_dir"):
        _loop.check_every(4, None)


def test_due_counts_steps_inside_a_segment():
    # Every 3 steps over a 10-step segment: 3, 6, 9; the segment's end saves itself.
    got = [d for d in range(1, 11) if _loop.due(d, 3, segment_end=d == 10)]
    assert got == [3, 6, 9]
    assert not _loop.due(12, 3, segment_end=True)
    assert not any(_loop.due(d, None, segment_end=False) for d in range(1, 10))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float64])
def test_floats_round_trip_bit_exact(dtype):
    # Device scalars (the steps' losses) or host ones (float64 needs no x64 on the host).
    make = np.asarray if dtype is np.float64 else jnp.asarray
    values = [make(v, dtype) for v in (0.1, -3.3e-5, 7.0, np.pi)]
    floats, name = _loop.floats_to_metadata(values)
    assert all(type(v) is float for v in floats)
    back = _loop.floats_from_metadata(floats, name)
    assert [b.dtype for b in back] == [np.asarray(v).dtype for v in values]
    np.testing.assert_array_equal(np.stack(back), np.stack([np.asarray(v) for v in values]))
    assert _loop.floats_to_metadata([]) == ([], "float32")


def test_save_refuses_a_nonfinite_state(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    tree = {"w": jnp.asarray([1.0, jnp.nan]), "count": jnp.asarray(3)}
    assert _loop.nonfinite_leaf(tree) == "w"
    assert _loop.nonfinite_leaf({"w": jnp.ones(2), "count": jnp.asarray(3)}) is None
    with pytest.raises(NonFiniteError, match=r"refusing to checkpoint step 4 .* leaf 'w'"):
        _loop.save(manager, 4, tree, {})
    assert manager.steps() == []  # nothing written


def test_other_run_names_what_differs():
    check = _loop.other_run({"seed": 1, "num_tasks": 3}, what="checkpoint in d", run="fit")
    assert check({"seed": 1, "num_tasks": 3, "completed": 2}) is None  # extra keys are fine
    msg = check({"seed": 2, "num_tasks": 3})
    assert msg == (
        "checkpoint in d is of another fit ({'seed': 2, 'num_tasks': 3}); "
        "this fit has {'seed': 1, 'num_tasks': 3} (use another folder)"
    )
    assert "{'seed': None" in _loop.other_run({"seed": 1}, what="x")({})
