import json

import pytest

from experiments import mtl
from tests.mtl.test_trainer_resume import trainer  # noqa: F401 (a fixture)


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_tiny_preset_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "mtl"
    res = mtl.main(["--preset", "tiny", "--out", str(out)])
    rows = res["summary"]["multi_mnist"]
    assert [r["method"] for r in rows] == ["single-task", "MGDA", "F-MGDA"]
    assert (out / "results.json").exists() and (out / "mtl_multi_mnist.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == {
        "multi_mnist/stl0/0",
        "multi_mnist/stl1/0",
        "multi_mnist/mgda/0",
        "multi_mnist/f-mgda/0",
    }
    # A second run finds every run in its checkpoint and trains nothing.
    res2 = mtl.main(["--preset", "tiny", "--out", str(out)])
    assert res2["runs"] == res["runs"]


def test_multi_mnist_gen_dataset_loads():
    import dataclasses

    cfg = dataclasses.replace(mtl.PRESETS["tiny"], num_train=64, num_val=16, num_test=16)
    left, right = mtl.load("multi_mnist_gen", cfg)
    assert left.x_train.shape == (64, 36, 36, 1) and len(right.y_test) == 16


def test_generated_task_sets_load_with_the_configured_sizes():
    import dataclasses

    cfg = dataclasses.replace(mtl.PRESETS["tiny"], num_train=40, num_val=8, num_test=12)
    left, right = mtl.load("multi_shapes", cfg)
    assert left.x_train.shape == (40, 36, 36, 1) and len(right.y_test) == 12
    assert left.num_classes == 10 and left.x_train is right.x_train
    content, colour, style = mtl.load("glyph_attributes", cfg)
    assert content.x_val.shape == (8, 32, 32, 3) and colour.x_val is content.x_val
    assert [t.name for t in (content, colour, style)] == ["content", "colour", "style"]
    with pytest.raises(ValueError, match="unknown datasets \\['fashion'\\]"):
        mtl.run(dataclasses.replace(cfg, datasets=("fashion",), out="/nonexistent/never"))


@pytest.mark.long  # make test-long: trains five small single-task models
@pytest.mark.parametrize("dataset", ["multi_shapes", "glyph_attributes"])
def test_single_task_runs_on_the_generated_task_sets(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    args = ["--preset", "tiny", "--datasets", dataset, "--methods", "none"]
    args += ["--num_train", "64", "--num_val", "16", "--num_test", "16", "--out", str(tmp_path)]
    res = mtl.main(args)
    (row,) = res["summary"][dataset]
    names = ["left", "right"] if dataset == "multi_shapes" else ["content", "colour", "style"]
    assert row["method"] == "single-task" and all(0 <= float(row[n]) <= 100 for n in names)
    assert set(res["runs"]) == {f"{dataset}/stl{k}/0" for k in range(len(names))}
    # single-task models only: no base / F-MTL pair, so no figure
    assert not (tmp_path / f"mtl_{dataset}.png").exists()


def test_paired_ci_is_the_t_interval():
    import numpy as np

    d = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean, lo, hi = mtl.paired_ci(d)
    # t_{0.975, 4} = 2.7764451 (tables); s = sqrt(2.5)
    half = 2.7764451 * np.sqrt(2.5) / np.sqrt(5)
    assert mean == 3.0 and np.isclose(lo, 3.0 - half) and np.isclose(hi, 3.0 + half)
    assert np.isnan(mtl.paired_ci([1.0])[1])


def test_paired_differences_pair_runs_of_the_same_seed():
    import dataclasses

    import numpy as np

    cfg = dataclasses.replace(mtl.PRESETS["tiny"], methods=("ew",), seeds=(0, 1, 2))
    tasks = [type("T", (), {"name": n})() for n in ("left", "right")]
    done = {f"d/stl{k}/{s}": {"test": [50.0]} for k in range(2) for s in (0, 1, 2)}
    base = {0: [50.0, 50.0], 1: [40.0, 60.0], 2: [45.0, 45.0]}
    gain = {0: 1.0, 1: 2.0, 2: 6.0}
    for s in (0, 1, 2):
        done[f"d/ew/{s}"] = {"test": base[s]}
        done[f"d/f-ew/{s}"] = {"test": [v + gain[s] for v in base[s]]}
    done.pop("d/f-ew/2")  # a seed without its F-run is left out of the pairs
    (p,) = mtl.paired_differences(cfg, "d", tasks, done)
    assert p["seeds"] == [0, 1]
    # Δm: 100 * mean((M - 50) / 50): a gain of g points on both tasks is 2g Δm points
    np.testing.assert_allclose(p["dm_diffs"], [2.0, 4.0])
    np.testing.assert_allclose(p["acc_diffs"], [1.0, 2.0])
    assert p["wins"] == 2 and p["dm_ci"][0] < 3.0 < p["dm_ci"][1]


def test_lenet_is_the_reference_trunk_and_keys_follow_the_seed():
    import jax
    import jax.numpy as jnp
    import optax

    from cljax import mtl as cmtl

    init = lambda: mtl.LeNet(10).init(jax.random.key(0), jnp.zeros((1, 36, 36, 1)))
    shapes = jax.eval_shape(init)["params"]
    # 10·9·9+10, 20·10·5·5+20, 500·50+50: the F-MTL code's LeNet (5×5×20 features)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 820 + 5020 + 25050
    params = {"w": jnp.zeros(3)}
    tx = optax.chain(cmtl.aggregate(cmtl.pcgrad, key=0), optax.adam(1e-3))
    st = mtl._reseed(tx.init(params), 3)
    ref = optax.chain(cmtl.aggregate(cmtl.pcgrad, key=3), optax.adam(1e-3)).init(params)
    assert jnp.array_equal(jax.random.key_data(st[0].key), jax.random.key_data(ref[0].key))


def test_methods_are_checked_before_training(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(mtl.PRESETS["tiny"], methods=("pcgard",), out=str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown methods \['pcgard'\]"):
        mtl.run(cfg)
    assert mtl._methods(dataclasses.replace(cfg, methods=("none",))) == ()


def test_merge_adds_the_finished_runs_of_other_folders(tmp_path):
    import dataclasses

    import numpy as np

    from cljax.checkpoint import CheckpointManager

    cfg = dataclasses.replace(mtl.PRESETS["tiny"], train=False, out=str(tmp_path / "a"))
    fp = mtl._fingerprint(cfg)
    r = lambda acc: {"test": acc, "best_val": 0.0}
    parts = {
        "b": {"multi_mnist/stl0/0": r([50.0]), "multi_mnist/stl1/0": r([40.0])},
        "c": {"multi_mnist/mgda/0": r([45.0, 44.0]), "multi_mnist/f-mgda/0": r([46.0, 44.0])},
    }
    for name, runs in parts.items():
        meta = {"runs": runs, "config": fp}
        CheckpointManager(tmp_path / name / "ckpt").save(
            1, {"count": np.ones((), np.int32)}, metadata=meta
        )
    res = mtl.run(dataclasses.replace(cfg, merge=(str(tmp_path / "b"), str(tmp_path / "c"))))
    assert set(res["runs"]) == set(parts["b"]) | set(parts["c"])
    (p,) = res["paired"]["multi_mnist"]
    np.testing.assert_allclose(p["dm_diffs"], [100 * (1 / 50) / 2])  # +1 point on the left
    other = dataclasses.replace(cfg, epochs=2, merge=(str(tmp_path / "b"),))
    with pytest.raises(ValueError, match="holds no runs of this configuration"):
        mtl.run(other)


def _flip_best_val_digit(root):
    """One digit of a stored run changed inside the manifest's metadata: valid JSON still,
    only the checksum can tell."""
    path = root / "manifest.json"
    text = path.read_bytes()
    i = text.index(b'"best_val": ') + len(b'"best_val": 0.')
    path.write_bytes(text[:i] + str((int(text[i : i + 1]) + 1) % 10).encode() + text[i + 1 :])


def test_damaged_run_records_here_and_in_merged_folders(tmp_path, monkeypatch):
    """The finished-run records (checkpoint metadata under ckpt/), damaged in this folder or
    in a --merge folder: each damaged record is moved aside with a warning, the one before it
    is read, exactly the runs it alone held are trained again, and the results equal those
    of one undamaged run; a merged folder with no readable record left is skipped with a
    warning, also on later runs, never an error. Training is a stand-in (a function of the
    task ids and the seed): what is tested is run()'s record keeping."""
    import dataclasses
    import shutil

    import numpy as np

    from tests.test_checkpoint import DAMAGE

    calls = []

    def train_one(cfg, tasks, ids, step_fn, predict, model, seed, **kw):
        calls.append((ids, seed))
        rng = np.random.default_rng([seed, *ids])
        test = rng.uniform(20, 90, len(ids)).tolist()
        return {"test": test, "best_val": float(rng.uniform()), "skipped": 0}

    monkeypatch.setattr(mtl, "train_one", train_one)
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    base = dataclasses.replace(mtl.PRESETS["tiny"], methods=("none",))

    def run(out, seeds=(0, 1), merge=()):
        calls.clear()
        merge = tuple(str(tmp_path / m) for m in merge)
        res = mtl.run(dataclasses.replace(base, seeds=seeds, out=str(tmp_path / out), merge=merge))
        drop = ("seconds", "cpu_seconds")
        runs = {k: {f: v for f, v in r.items() if f not in drop} for k, r in res["runs"].items()}
        return runs, res["summary"]

    want = run("all")
    every = [((0,), 0), ((1,), 0), ((0,), 1), ((1,), 1)]
    assert calls == every
    run("b", seeds=(0,))  # records step_1 (stl0, seed 0), step_2 (+ stl1, seed 0)
    run("c", seeds=(1,))
    assert run("a", merge=("b", "c")) == want and calls == []
    # the newest record of a merged folder damaged: the one before it is merged instead
    kinds = {
        "flip a stored digit": _flip_best_val_digit,
        "truncate manifest": DAMAGE["truncate manifest"],
        "delete manifest": DAMAGE["delete manifest"],
        "flip array byte": DAMAGE["flip array byte"],
    }
    for i, (kind, damage) in enumerate(kinds.items()):
        if i:
            shutil.rmtree(tmp_path / "b")
            run("b", seeds=(0,))
        damage(tmp_path / "b" / "ckpt" / "step_2")
        with pytest.warns(UserWarning, match=r"b/ckpt/step_2.*moved .* aside"):
            assert run(f"a{i}", merge=("b", "c")) == want, kind
        assert calls == [((1,), 0)], kind  # only the run the damaged record alone held
        assert (tmp_path / "b" / "ckpt" / ".corrupt-2").is_dir()  # kept, not deleted
    # every record of a merged folder damaged: skipped with a warning, its runs trained here
    for step in (1, 2):
        DAMAGE["flip array byte"](tmp_path / "c" / "ckpt" / f"step_{step}")
    with pytest.warns(UserWarning, match=r"'.*c' has no readable run record"):
        assert run("m", merge=("b", "c")) == want
    assert calls == every[1:]  # b's step_1 still holds the first run
    with pytest.warns(UserWarning, match=r"'.*c' has no readable run record"):
        assert run("m", merge=("b", "c")) == want  # again: a warning, not an error
    assert calls == []
    # this folder's own newest record damaged: back to the one before, its run trained again
    DAMAGE["truncate manifest"](tmp_path / "all" / "ckpt" / "step_4")
    with pytest.warns(UserWarning, match=r"all/ckpt/step_4.*moved .* aside"):
        assert run("all") == want
    assert calls == every[3:]
    for step in (3, 4):  # both records kept (keep=2) damaged: every run again
        DAMAGE["flip manifest byte"](tmp_path / "all" / "ckpt" / f"step_{step}")
    with pytest.warns(UserWarning, match=r"all/ckpt/step_3"):
        assert run("all") == want
    assert calls == every
    with pytest.raises(ValueError, match="holds no runs of this configuration"):
        run("x", merge=("missing",))  # a folder that never held runs is an error


@pytest.mark.long  # make test-long: three crashed and resumed runs cost more than CI allows
@pytest.mark.slow
def test_damaged_checkpoint_of_a_run_in_progress_resumes_bitwise(trainer, tmp_path):  # noqa: F811
    """--checkpoint_every: a run stopped part-way (checkpoints after steps 4 and 6 kept) has
    its newest checkpoint damaged, or both: the re-run names it, moves it aside, goes back to
    the one before (or starts over) and goes through the same train states, step for step,
    to the result of an uninterrupted run. The trainer and its crash are those of
    tests/mtl/test_trainer_resume.py (one compiled step for every run)."""
    from tests.mtl.test_trainer_resume import EVERY, _Crash, _run
    from tests.test_checkpoint import DAMAGE

    ref_states = {}
    reference = _run(trainer, ref_states)
    for kind, damaged, back in [
        ("flip array byte", (6,), 4),
        ("unseen: truncate metadata", (6,), 4),
        ("delete manifest", (4, 6), 0),
    ]:
        d = tmp_path / kind
        states = {}
        with pytest.raises(_Crash):  # after 7 steps: saved at 3, 4 and 6; 4 and 6 kept
            _run(trainer, states, crash=7, checkpoint_dir=d, checkpoint_every=EVERY)
        for step in damaged:
            DAMAGE[kind](d / f"step_{step}")
        resumed = {}
        with pytest.warns(UserWarning, match=rf"step_{damaged[-1]}.*moved .* aside"):
            res = _run(trainer, resumed, checkpoint_dir=d, checkpoint_every=EVERY)
        assert sorted(resumed) == list(range(back + 1, 13)), kind
        assert {**states, **resumed} == ref_states and res == reference, kind
