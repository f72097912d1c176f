"""Smoke test of experiments/atlas.py: the tiny preset runs end to end and writes its outputs."""

import dataclasses
import json

import pytest

from experiments import atlas as atlas_exp


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """One stand-in pool for the tests of this file (building it is most of their time)."""
    return tmp_path_factory.mktemp("atlas") / "pool"


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_tiny_preset_runs_and_resumes(tmp_path, monkeypatch, pool_dir):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "atlas"
    # Negation and aTLAS×K share these code paths (fit, objectives, blocks); they are left out
    # to keep the smoke test short.
    # The digit pool: quick to build. The embedded pool differs only in its control head
    # (test_embedded_pool_negates_against_the_zero_shot_control_head).
    args = ["--preset", "digits-tiny", "--out", str(out), "--pool_dir", str(pool_dir)]
    args += ["--parts", "addition", "few_shot", "tta"]
    results = atlas_exp.main(args)
    for name in ("results.json", "tables.md", "atlas.png", "units.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"addition", "few_shot", "tta", "finetuned"}
    add = results["addition"]
    assert 0.0 <= add["task_arithmetic"]["absolute"] <= 100.0
    assert all(0.0 <= r["absolute"] <= 100.0 for r in add["aTLAS"])
    # The evidence for reading the result: the validation curve and the validation scores.
    first = add["aTLAS"][0]
    assert [h["epoch"] for h in first["history"]] == [0, 1]
    assert first["val_normalized"] == 100 * first["history"][first["best_epoch"]]["normalized"]
    ta = add["task_arithmetic"]
    assert len(ta["val_scores"]) == 3 and ta["val_normalized"] == max(ta["val_scores"])
    assert set(saved["few_shot"][0]) == {"k=1", "k=4"}
    # A re-run restores every unit from units.json instead of training again.
    units_before = (out / "units.json").read_text()
    atlas_exp.main(args)
    assert (out / "units.json").read_text() == units_before


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x5A
    path.write_bytes(bytes(b))


def _flip_digit(path):
    """One digit of a stored accuracy changed: still valid JSON, only the checksum can tell."""
    text = path.read_text()
    at = text.index('"finetuned"')
    i = at + text[at:].index(".") + 1
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :])


UNITS_DAMAGE = {
    "truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "flip byte": _flip,
    "flip digit": _flip_digit,
    "delete": lambda p: p.unlink(),
}


def _untimed(results):
    """results.json without its timings and config (a recomputed unit takes another time)."""
    return {k: v for k, v in results.items() if k not in ("timing_s", "wall_s", "config")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "kinds",
    [
        # unreadable, and readable but altered: the two ways load_json can refuse a record
        ("truncate", "flip digit"),
        pytest.param(("flip byte", "delete"), marks=pytest.mark.long),
    ],
)
def test_damaged_units_file_is_moved_aside_and_recomputed(tmp_path, monkeypatch, pool_dir, kinds):
    """Each kind of damage to units.json: the re-run finishes with identical results."""
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "atlas"
    cfg = dataclasses.replace(
        atlas_exp.Config(),
        **{**atlas_exp.PRESETS["digits-tiny"], "preset": "digits-tiny", "parts": ("addition",)},
        out=str(out),
        pool_dir=str(pool_dir),
    )
    pool = atlas_exp.load_pool(cfg, out)  # once: main() would load it on every re-run
    want = _untimed(atlas_exp.run(cfg, pool, out))
    # results.json holds the table's rows as printed, from the per-seed records
    row = want["tables"]["Task addition (test, mean over tasks)"][-1]
    assert row["method"] == "aTLAS"
    assert row["absolute (%)"] == f"{want['addition']['aTLAS'][0]['absolute']:.1f} ± 0.0"
    for name in kinds:
        UNITS_DAMAGE[name](out / "units.json")
        assert _untimed(atlas_exp.run(cfg, pool, out)) == want, name
        assert (out / "units.json").is_file(), name  # written again
    moved = sum(name != "delete" for name in kinds)
    assert len(list(out.glob("units.json.corrupt-*"))) == moved  # the damaged copies are kept


def test_embedded_pool_negates_against_the_zero_shot_control_head():
    """On the embedded benchmark the control task keeps its zero-shot head (no fitted probe),
    and every head is padded to the widest task, the 70-class control included."""
    import numpy as np

    from cljax.data import Task
    from experiments import merging as merging_exp

    rng = np.random.default_rng(0)

    def task(name, c):
        x, y = rng.normal(size=(8, 4)).astype(np.float32), np.arange(8) % c
        return Task(name, tuple(map(str, range(c))), x, y, x, y, x, y)

    tasks, control = (task("a", 3), task("b", 5)), task("control", 7)
    heads = {
        t.name: {
            "kernel": rng.normal(size=(4, t.num_classes)).astype(np.float32),
            "bias": np.zeros(t.num_classes, np.float32),
        }
        for t in (*tasks, control)
    }
    enc = type("Enc", (), {"apply": staticmethod(lambda v, x: x @ v["params"]["w"])})()
    theta0 = {"w": np.eye(4, dtype=np.float32)}
    taus = tuple({"w": np.full((4, 4), 0.1 * i, np.float32)} for i in (1, 2))
    mp = merging_exp.Pool(
        None, enc, theta0, heads, tasks, taus, taus, control, {"trained": [], "restored": []}
    )
    pool = atlas_exp._as_pool(mp)
    ctrl_task, ctrl_head = pool.control
    assert ctrl_task is control
    np.testing.assert_array_equal(ctrl_head["kernel"], heads["control"]["kernel"])
    assert all(h["kernel"].shape == (4, 7) for h in pool.heads)
    np.testing.assert_array_equal(pool.heads[0]["bias"][3:], -1e9)  # padded logits never win


def _linear_pool(n_tasks=3, dim=6, seed=0):
    """A pool whose encoder is a matrix (features = x @ w): accuracies checkable by hand."""
    import jax.numpy as jnp
    import numpy as np

    from cljax.data import Task

    rng = np.random.default_rng(seed)

    def task(name, c, n):
        def split(m):
            return rng.normal(size=(m, dim)).astype(np.float32), rng.integers(0, c, m)

        return Task(name, tuple(map(str, range(c))), *split(n), *split(n // 2), *split(n + 3))

    tasks = [task(f"t{i}", 3 + i, 40 + 7 * i) for i in range(n_tasks)]
    width = 3 + n_tasks
    heads = [
        {
            "kernel": rng.normal(size=(dim, width)).astype(np.float32),
            "bias": np.where(np.arange(width) < t.num_classes, 0.0, -1e9).astype(np.float32),
        }
        for t in tasks
    ]
    theta0 = {"w": jnp.asarray(np.eye(dim, dtype=np.float32))}
    taus = {"w": jnp.asarray(rng.normal(0, 0.3, size=(n_tasks, dim, dim)).astype(np.float32))}
    return atlas_exp.Pool(
        tasks,
        lambda p, x: x @ p["w"],
        lambda h, f: f @ h["kernel"] + h["bias"],
        theta0,
        taus,
        heads,
        (tasks[0], heads[0]),
    )


def _reference_accuracy(enc, head, x, y):
    import numpy as np

    logits = (np.asarray(x) @ np.asarray(enc["w"])) @ head["kernel"] + head["bias"]
    return float(np.mean(np.argmax(logits, -1) == y))


def test_accuracy_scores_many_sets_in_one_pass_as_one_at_a_time():
    """_Accuracy.many encodes every item's images together, in chunks of eval_batch padded to
    the granule; each accuracy equals the one computed directly, θ0's cached features too."""
    import numpy as np

    from experiments import _atlas_stages as stages

    pool = _linear_pool()
    acc = stages._Accuracy(pool, eval_batch=32)  # chunks of 32: the splits cross chunk edges
    theta = {"w": pool.pretrained["w"] + 0.5 * pool.task_vectors["w"][1]}
    x, y = pool.tasks[2].split("train")
    items = [(pool.heads[i], t, s) for i, t in enumerate(pool.tasks) for s in ("val", "test")]
    items.append((pool.heads[2], x[:5], y[:5]))  # arrays, not a task's split
    for enc in (theta, pool.pretrained, pool.pretrained):  # the last: θ0's features cached
        got = acc.many(enc, items)
        want = [
            _reference_accuracy(enc, h, *(t.split(s) if isinstance(s, str) else (t, s)))
            for h, t, s in items
        ]
        np.testing.assert_allclose(got, want, atol=1e-12)
    x0, y0 = pool.tasks[0].split("val")
    assert acc(theta, pool.heads[0], pool.tasks[0], "val") == _reference_accuracy(
        theta, pool.heads[0], x0, y0
    )
    assert set(acc._theta0) == {(t.name, s) for t in pool.tasks for s in ("val", "test")}


def test_few_shot_task_arithmetic_picks_each_k_its_own_lambda():
    """The λ grid scored once for every k-shot set together gives, per k, the λ that a
    separate search on that set alone picks, and the test accuracy of that λ's merge. The
    grid is the few-shot one (``few_shot_lambda_grid`` points), not addition's."""
    from cljax.merging import select_scale, task_arithmetic
    from experiments import _atlas_stages as stages

    pool = _linear_pool()
    cfg = dataclasses.replace(
        atlas_exp.Config(), lambda_grid=3, few_shot_lambda_grid=6, shots=(1, 2, 4)
    )
    acc = stages._Accuracy(pool, eval_batch=64)
    task, head = pool.tasks[1], pool.heads[1]
    taus = stages._others(pool, 1)
    shots = {k: stages._k_shot(task, k, seed=3) for k in cfg.shots}
    got = stages._ta_few_shot(pool, cfg, taus, head, task, shots, acc)
    grid = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]

    def merged(lam):
        return task_arithmetic(pool.pretrained, taus, lam)

    for k, (x, y) in shots.items():
        lam, _ = select_scale(lambda v, x=x, y=y: _reference_accuracy(merged(v), head, x, y), grid)
        assert got[k] == _reference_accuracy(merged(lam), head, *task.split("test")), k


def test_unit_names_cover_parts_seeds_and_partitions():
    cfg = dataclasses.replace(
        atlas_exp.Config(), seeds=(0, 1), parts=("negation", "partitions"), partitions=(2, 4)
    )
    assert atlas_exp._unit_names(cfg) == [
        "negation/0",
        "negation/1",
        "partitions/2/0",
        "partitions/4/0",
        "partitions/2/1",
        "partitions/4/1",
        "task_arithmetic",
    ]
    with pytest.raises(ValueError, match="unknown part 'fewshot'"):
        atlas_exp._unit_names(dataclasses.replace(cfg, parts=("fewshot",)))
