"""experiments/class_incremental.py: the tiny preset end to end, the NCM probe, the stages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.data import Task
from experiments import class_incremental as ci


def test_ncm_probe_matches_a_loop_over_seen_classes():
    rng = np.random.default_rng(0)
    tasks = []
    for t in range(3):
        y = np.repeat(np.arange(2, dtype=np.int32), 5)
        # six class directions in 6-d plus noise: distinct classes, some test errors
        x = rng.normal(size=(10, 6)).astype(np.float32)
        x += 1.5 * np.eye(6, dtype=np.float32)[2 * t + y]
        tasks.append(Task(f"t{t}", ("a", "b"), x, y, x[:1], y[:1], x[::-1], y[::-1]))
    acc = ci.ncm_accuracy(tasks, lambda p, x: x * p, jnp.ones(()))
    unit = lambda z: z / np.linalg.norm(z, axis=-1, keepdims=True)  # noqa: E731
    means = [unit(t.x_train[t.y_train == c].mean(0)) for t in tasks for c in range(2)]
    for j in range(3):
        for i in range(3):
            seen = 2 * (max(i, j) + 1)
            hits = [
                np.argmax([unit(x) @ m for m in means[:seen]]) == 2 * i + y
                for x, y in zip(tasks[i].x_test, tasks[i].y_test, strict=True)
            ]
            assert acc[j, i] == pytest.approx(np.mean(hits))


def test_trainable_labels_and_augment():
    assert (
        ci._label(
            ["encoder", "vision_model", "encoder", "layers_3", "self_attn", "out_proj", "kernel"]
        )
        == "enc"
    )
    assert (
        ci._label(["encoder", "vision_model", "encoder", "layers_0", "mlp", "fc1", "kernel"])
        == "frozen"
    )
    assert ci._label(["head", "kernel"]) == "head"
    x = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 32, 3)
    v = ci.augment(jax.random.key(0), x)
    assert v.shape == x.shape and not np.allclose(np.asarray(v), np.asarray(x))


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_tiny_preset_runs_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "ci"
    rows = ci.main(["--preset", "tiny", "--out", str(out)])
    assert [r["method"] for r in rows] == ["naive", "ncm"]
    res = json.loads((out / "results.json").read_text())
    for r in res["runs"]:
        a = np.asarray(r["accuracy"])
        assert a.shape == (2, 2) and ((0 <= a) & (a <= 1)).all()
    assert (out / "heatmap_class_incremental.png").stat().st_size > 0
    assert ci.main(["--preset", "tiny", "--out", str(out)]) == rows
