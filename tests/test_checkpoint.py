import json
import os
import shutil

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


# ------------------------------------------------------------------ damaged checkpoints


def _data_files(root):
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.stat().st_size > 0 and p.name != "manifest.json"
    )


def _array_file(root):
    # the merged OCDBT store under state/d holds the array bytes
    return max(_data_files(root / "state" / "d"), key=lambda p: p.stat().st_size)


def _flip(path, at=None):
    b = bytearray(path.read_bytes())
    b[len(b) // 2 if at is None else at] ^= 0x5A
    path.write_bytes(bytes(b))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _rewrite_manifest(root):
    """Recomputes the manifest's table: damage the manifest cannot see."""
    from cljax.checkpoint import _manifest_bytes, _parse_manifest, _sha256

    manifest = _parse_manifest((root / "manifest.json").read_bytes())
    manifest["files"] = {
        rel: {"size": (root / rel).stat().st_size, "sha256": _sha256(root / rel)}
        for rel in manifest["files"]
        if (root / rel).is_file()
    }
    (root / "manifest.json").write_bytes(_manifest_bytes(manifest))


DAMAGE = {
    "truncate array file": lambda r: _truncate(_array_file(r)),
    "flip array byte": lambda r: _flip(_array_file(r)),
    "delete array file": lambda r: _array_file(r).unlink(),
    "truncate every file": lambda r: [_truncate(p) for p in _data_files(r)],
    "flip orbax metadata byte": lambda r: _flip(r / "state" / "_METADATA"),
    "delete manifest": lambda r: (r / "manifest.json").unlink(),
    "truncate manifest": lambda r: _truncate(r / "manifest.json"),
    "flip manifest byte": lambda r: _flip(r / "manifest.json"),
    "flip manifest metadata byte": lambda r: _flip(
        r / "manifest.json", (r / "manifest.json").read_bytes().index(b'"epoch": ') + 9
    ),
    "empty folder": lambda r: [shutil.rmtree(r), r.mkdir()],
    # the manifest is rewritten to match: only orbax can tell
    "unseen: delete array files": lambda r: [
        [p.unlink() for p in _data_files(r / "state" / "d")],
        _rewrite_manifest(r),
    ],
    "unseen: truncate array files": lambda r: [
        [_truncate(p) for p in _data_files(r / "state" / "d")],
        _rewrite_manifest(r),
    ],
    "unseen: truncate metadata": lambda r: [
        _truncate(r / "state" / "_METADATA"),
        _rewrite_manifest(r),
    ],
    "unseen: delete ocdbt manifest": lambda r: [
        (r / "state" / "manifest.ocdbt").unlink(),
        _rewrite_manifest(r),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_moved_aside_and_replaced(tmp_path, damage):
    m = CheckpointManager(tmp_path, keep=3)
    m.save(1, _tree(1.0), metadata={"epoch": 1})
    m.save(2, _tree(2.0), metadata={"epoch": 2})
    DAMAGE[damage](tmp_path / "step_2")
    with pytest.warns(UserWarning, match=r"step_2.*moved .* aside to .*\.corrupt-2"):
        step, tree, meta = m.restore_latest(_tree())
    assert (step, meta) == (1, {"epoch": 1})
    assert tree_fingerprint(tree) == tree_fingerprint(_tree(1.0))
    assert m.steps() == [1] and (tmp_path / ".corrupt-2").is_dir()  # kept, not deleted
    # the run goes on from step 1 and saves step 2 again: no "already exists" crash loop
    m.save(2, _tree(2.0), metadata={"epoch": 2})
    step, tree, meta = CheckpointManager(tmp_path).restore_latest(_tree())
    assert (step, meta) == (2, {"epoch": 2})
    assert tree_fingerprint(tree) == tree_fingerprint(_tree(2.0))


@pytest.mark.parametrize(
    "damage", ["flip array byte", "delete manifest", "unseen: delete array files"]
)
def test_only_checkpoint_damaged_starts_over_and_saving_over_it_works(tmp_path, damage):
    m = CheckpointManager(tmp_path)
    m.save(3, _tree(3.0))
    DAMAGE[damage](tmp_path / "step_3")
    with pytest.warns(UserWarning, match="step_3"):
        assert m.restore_latest(_tree()) is None
    assert m.restore_latest(_tree()) is None  # and again: nothing left to trip over
    m.save(3, _tree(4.0))
    assert tree_fingerprint(m.restore_latest(_tree())[1]) == tree_fingerprint(_tree(4.0))
    # twice damaged: both copies kept under their own names
    DAMAGE[damage](tmp_path / "step_3")
    with pytest.warns(UserWarning, match=r"\.corrupt-3-2"):
        assert m.restore_latest(_tree()) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".corrupt-3", ".corrupt-3-2"]


def test_save_over_a_damaged_step_without_restoring_first(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(1, _tree(1.0))
    _truncate(_array_file(tmp_path / "step_1"))
    with pytest.warns(UserWarning, match="saving over it"):
        m.save(1, _tree(5.0))
    assert tree_fingerprint(m.restore(1, _tree())[0]) == tree_fingerprint(_tree(5.0))
    with pytest.raises(ValueError, match="already exists"):  # a good one is never replaced
        m.save(1, _tree())


def test_wrong_target_raises_and_moves_nothing(tmp_path, recwarn):
    m = CheckpointManager(tmp_path, keep=3)
    m.save(1, _tree(1.0))
    m.save(2, _tree(2.0))
    wrong = {**_tree(), "extra": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"step_2 does not fit the target tree.*'extra'"):
        m.restore_latest(wrong)
    shaped = {**_tree(), "w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"'w' is stored with shape \(3, 2\)"):
        m.restore_latest(shaped)
    assert m.steps() == [1, 2] and not recwarn.list
    # an older checkpoint that fits shows the newer misfit is damage: that one is moved aside
    m.save(3, {"w": jnp.ones(3)})
    with pytest.warns(UserWarning, match=r"step_3 does not fit.*but checkpoint 2 fits"):
        step, _, _ = m.restore_latest(_tree())
    assert step == 2 and m.steps() == [1, 2]


def test_manifest_written_by_an_older_version_is_read(tmp_path):
    import json

    from cljax.checkpoint import _parse_manifest

    m = CheckpointManager(tmp_path)
    m.save(1, _tree(1.0), metadata={"epoch": 1})
    mpath = tmp_path / "step_1" / "manifest.json"
    mpath.write_text(json.dumps(_parse_manifest(mpath.read_bytes())))  # plain JSON
    step, tree, meta = m.restore_latest(_tree())
    assert (step, meta) == (1, {"epoch": 1})


# ------------------------------------------------------------------------- run records

_RECORD = {"acc": [[0.5, 0.25], [0.125, 1.0]], "name": "pmnist", "seed": 3, "nan": None}


def _flip_digit(path):
    """Changes one digit: still valid JSON, only the checksum can tell."""
    text = path.read_text()
    i = text.index("0.125") + 2
    path.write_text(text[:i] + "9" + text[i + 1 :])


RECORD_DAMAGE = {
    "truncate": _truncate,
    "truncate to nothing": lambda p: p.write_bytes(b""),
    "flip byte": _flip,
    "flip digit (valid JSON)": _flip_digit,
    "not utf-8": lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()),
    "plain JSON without the checksum": lambda p: p.write_text(json.dumps(_RECORD)),
    "a folder in its place": lambda p: [p.unlink(), p.mkdir()],
}


def test_run_record_roundtrip(tmp_path):
    import numpy as np

    from cljax.checkpoint import load_json, save_json

    path = tmp_path / "runs" / "a.json"
    assert load_json(path) is None  # missing: compute it
    obj = {**_RECORD, "tuple": (1, 2), "np": np.float32(0.1), 7: "int key"}
    save_json(path, obj)
    got = load_json(path)
    assert got == {**_RECORD, "tuple": [1, 2], "np": float(np.float32(0.1)), "7": "int key"}
    assert json.loads(path.read_text())["data"] == got  # plain JSON to any reader
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary left
    with pytest.raises(TypeError):
        save_json(path, {"x": object()})
    assert load_json(path) == got  # a failed write leaves the old record


@pytest.mark.parametrize("damage", list(RECORD_DAMAGE))
def test_damaged_run_record_is_moved_aside(tmp_path, damage):
    from cljax.checkpoint import load_json, save_json

    path = tmp_path / "a.json"
    save_json(path, _RECORD)
    RECORD_DAMAGE[damage](path)
    with pytest.warns(UserWarning, match=r"a\.json: .*moved it aside to .*a\.json\.corrupt-1"):
        assert load_json(path) is None
    assert not path.exists() and (tmp_path / "a.json.corrupt-1").exists()  # kept
    assert load_json(path) is None  # nothing left to trip over
    save_json(path, _RECORD)
    assert load_json(path) == _RECORD
    RECORD_DAMAGE[damage](path)  # damaged twice: both copies kept
    with pytest.warns(UserWarning, match=r"a\.json\.corrupt-2"):
        assert load_json(path) is None
    assert (tmp_path / "a.json.corrupt-1").exists() and (tmp_path / "a.json.corrupt-2").exists()


def test_only_the_primary_moves_a_damaged_record(tmp_path, recwarn):
    from cljax.checkpoint import load_json, save_json

    path = tmp_path / "a.json"
    save_json(path, _RECORD)
    _truncate(path)
    assert load_json(path, primary=False) is None
    assert path.exists() and not recwarn.list


def test_quarantine_warnings_name_the_caller_and_keep_every_copy(tmp_path):
    # One move-aside serves checkpoints and files: free names counted up, nothing deleted;
    # each warning points at the line that asked (load_json's caller, quarantine_file's caller).
    from cljax.checkpoint import load_json, quarantine_file, save_json

    path = tmp_path / "a.json"
    for n in (1, 2):
        path.write_text("not json")
        with pytest.warns(UserWarning, match=rf"a\.json\.corrupt-{n}") as got:
            assert load_json(path) is None
        assert got[0].filename == __file__
    path.write_text("x")
    with pytest.warns(
        UserWarning, match=r"a\.json: cache; moved it aside to .*a\.json\.corrupt-3"
    ) as got:
        assert quarantine_file(path, "cache") == tmp_path / "a.json.corrupt-3"
    assert got[0].filename == __file__
    assert quarantine_file(path) is None  # nothing left to move: no warning
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a.json.corrupt-{n}" for n in (1, 2, 3)]
    m = CheckpointManager(tmp_path / "ckpt")
    m.save(4, _tree())
    with pytest.warns(UserWarning, match=r"bad; moved .*step_4 aside to .*\.corrupt-4") as got:
        assert m.quarantine(4, "bad") == m.directory / ".corrupt-4"
    assert got[0].filename == __file__
    assert m.quarantine(4) is None and m.steps() == []
    save_json(path, {"a": 1})
    assert quarantine_file(path, primary=False) is None and path.exists()


def test_a_checkpoint_of_a_renamed_field_restores_under_the_new_name(tmp_path):
    # TrainState.rng became TrainState.key: runs saved before the rename resume, the key and
    # every other leaf (bfloat16 and nested ones included) restored bit for bit.
    m = CheckpointManager(tmp_path)
    old = {"w": jnp.full((3, 2), 2.5), "h": {"b": jnp.arange(4, dtype=jnp.bfloat16)}}
    m.save(7, {**old, "rng": jax.random.key(11), "step": jnp.int32(7)})
    target = {**old, "key": jax.random.key(0), "step": jnp.int32(0)}
    target["w"] = jnp.zeros((3, 2))
    step, tree, _ = m.restore_latest(target)
    assert step == 7 and set(tree) == {"w", "h", "key", "step"}
    chex.assert_trees_all_equal(tree["w"], old["w"])
    chex.assert_trees_all_equal(tree["h"], old["h"])
    assert tree["h"]["b"].dtype == jnp.bfloat16 and int(tree["step"]) == 7
    assert jnp.array_equal(
        jax.random.key_data(tree["key"]), jax.random.key_data(jax.random.key(11))
    )
    # Any other difference of names is still refused, naming the leaves.
    with pytest.raises(ValueError, match="leaves missing from the checkpoint"):
        m.restore(7, {**target, "extra": jnp.zeros(())})
