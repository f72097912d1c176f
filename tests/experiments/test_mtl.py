import json

import pytest

from experiments import mtl


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
