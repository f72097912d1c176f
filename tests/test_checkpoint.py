import os

import chex
import jax
import jax.numpy as jnp
import pytest

from cljax.checkpoint import CheckpointCorruptError, CheckpointManager, tree_fingerprint


def _tree(v=1.0):
    return {
        "w": jnp.full((3, 2), v),
        "h": jnp.arange(4, dtype=jnp.bfloat16),
        "rng": jax.random.key(3),
    }


def test_save_restore_roundtrip_and_keep(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    for s in range(4):
        m.save(s, _tree(float(s)), metadata={"epoch": s})
    assert m.steps() == [2, 3]
    step, tree, meta = m.restore_latest(_tree())
    assert step == 3 and meta == {"epoch": 3}
    chex.assert_trees_all_equal(tree["w"], _tree(3.0)["w"])
    assert tree["h"].dtype == jnp.bfloat16
    assert tree_fingerprint(tree) == tree_fingerprint(_tree(3.0))
    with pytest.raises(ValueError, match="already exists"):
        m.save(3, _tree())


def test_corrupt_checkpoint_falls_back_by_name(tmp_path):
    m = CheckpointManager(tmp_path, keep=3)
    m.save(1, _tree(1.0))
    m.save(2, _tree(2.0))
    # truncate one data file of the newest checkpoint
    files = [
        p
        for p in (tmp_path / "step_2").rglob("*")
        if p.is_file() and p.stat().st_size > 0 and p.name != "manifest.json"
    ]
    victim = max(files, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(CheckpointCorruptError, match="step_2"):
        m.verify(2)
    with pytest.warns(UserWarning, match="step_2"):
        step, tree, _ = m.restore_latest(_tree())
    assert step == 1
    chex.assert_trees_all_equal(tree["w"], _tree(1.0)["w"])


def test_incomplete_write_is_ignored(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(5, _tree(5.0))
    os.makedirs(tmp_path / ".tmp-6-dead")  # a crash mid-write leaves only a temp folder
    (tmp_path / "step_7").mkdir()  # or a folder without manifest
    m2 = CheckpointManager(tmp_path)
    assert not (tmp_path / ".tmp-6-dead").exists()
    with pytest.warns(UserWarning, match="no manifest"):
        step, _, _ = m2.restore_latest(_tree())
    assert step == 5
    assert CheckpointManager(tmp_path / "empty").restore_latest(_tree()) is None
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)
