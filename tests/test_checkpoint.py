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


def test_restore_into_another_dtype_needs_allow_cast(tmp_path):
    m = CheckpointManager(tmp_path)
    stored = {"w": jnp.asarray([1.5, -2.25, 3.0], jnp.float32), "n": jnp.arange(2, dtype=jnp.int32)}
    m.save(1, stored)
    target = {"w": jnp.zeros(3, jnp.int32), "n": jnp.zeros(2, jnp.int32)}
    with pytest.raises(ValueError, match=r"step_1: 'w' is stored as float32, the target has int32"):
        m.restore(1, target)
    with pytest.raises(ValueError, match="allow_cast=True"):
        m.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target))
    # asked for: converted as numpy converts (truncation toward zero)
    tree, _ = m.restore(1, target, allow_cast=True)
    assert tree["w"].dtype == jnp.int32
    chex.assert_trees_all_equal(tree["w"], jnp.asarray([1, -2, 3], jnp.int32))
    step, tree, _ = m.restore_latest(
        {"w": jnp.zeros(3, jnp.bfloat16), "n": target["n"]}, allow_cast=True
    )
    assert step == 1 and tree["w"].dtype == jnp.bfloat16
    # same dtypes restore without the flag, PRNG keys included
    m.save(2, _tree(2.0))
    _, tree, _ = m.restore_latest(_tree())
    assert tree_fingerprint(tree) == tree_fingerprint(_tree(2.0))
