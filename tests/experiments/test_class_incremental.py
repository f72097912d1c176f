"""experiments/class_incremental.py: the tiny preset end to end, the NCM probe, the stages."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax import continual as cl
from cljax.data import Task
from cljax.train import TrainState
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


# ------------------------------------------------------------------ damaged run records


@pytest.fixture
def jax_cache_settings():
    """main() points JAX's compilation cache into --out; put the settings back after."""
    before = {
        k: getattr(jax.config, k)
        for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    yield
    for k, v in before.items():
        jax.config.update(k, v)


def _stand_in(calls):
    """A cheap stand-in for run_one: a record of the same layout, a function of (method,
    seed) only, so a recomputed run must reproduce the lost one exactly; its ``seconds``
    differ from call to call, as a real run's do."""

    def run_one(cfg, method, seed, tasks):
        del tasks
        calls.append((method, seed))
        rng = np.random.default_rng([seed, ci.METHODS.index(method)])
        acc = np.tril(rng.uniform(size=(cfg.stages, cfg.stages)))
        bwt = np.mean([acc[-1, i] - acc[i, i] for i in range(cfg.stages - 1)])
        return {
            "method": method,
            "seed": seed,
            "accuracy": acc.tolist(),
            "metrics": {"acc": float(acc[-1].mean()), "bwt": float(bwt)},
            "seconds": 0.5 + len(calls),
            "head": cfg.head,
            "imprint": cfg.imprint,
        }

    return run_one


def _outcome(runs):
    """Runs or table rows without their timings (a recomputed run takes another time)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "s/run")} for r in runs]


def test_damaged_run_records_are_moved_aside_and_recomputed(
    tmp_path, monkeypatch, jax_cache_settings
):
    """Each kind of damage to runs/*.json, in a finished run and in one stopped part-way:
    the damaged records are kept aside, exactly their runs are redone, and the table and
    results.json come out identical. Training is a stand-in (a real run of the tiny preset
    takes minutes of CPU): what is tested is main()'s record keeping."""
    from tests.experiments.test_continual_experiment import RUN_FILE_DAMAGE

    calls = []
    monkeypatch.setattr(ci, "stage_tasks", lambda cfg, seed: [])
    monkeypatch.setattr(ci, "run_one", _stand_in(calls))
    monkeypatch.setattr(ci, "heatmaps", lambda path, title, mats: None)
    out = tmp_path / "ci"
    args = ["--preset", "tiny", "--seeds", "0", "1", "--out", str(out)]
    everything = [("naive", 0), ("ncm", 0), ("naive", 1), ("ncm", 1)]

    def rerun(*extra):
        calls.clear()
        rows = _outcome(ci.main(args + list(extra)))
        return rows, _outcome(json.loads((out / "results.json").read_text())["runs"])

    want = rerun()
    assert calls == everything
    records = [out / "runs" / f"{m}-s{s}.json" for m, s in everything]
    # a finished run: every record damaged
    for name, damage in RUN_FILE_DAMAGE.items():
        for path in records:
            damage(path)
        if name == "delete":
            assert rerun() == want, name
        else:
            with pytest.warns(UserWarning, match="moved it aside") as warned:
                assert rerun() == want, name
            assert len(warned) == 4, name  # each record named
        assert calls == everything, name
        assert all(path.is_file() for path in records), name  # written again
    assert len(list((out / "runs").glob("*.json.corrupt-*"))) == 3 * 4  # all kept
    # a run stopped part-way: the first record kept, the second damaged, the third lost in
    # a crash during its write (a half-written .part beside it), the fourth never begun
    part = records[2].with_name(records[2].name + ".part")
    part.write_bytes(records[2].read_bytes()[:50])
    records[2].unlink()
    records[3].unlink()
    records[1].write_bytes(records[1].read_bytes()[:-30])
    with pytest.warns(UserWarning, match=r"ncm-s0\.json: damaged run record"):
        assert rerun() == want
    assert calls == everything[1:]
    assert not part.exists()
    # a record whose checksum is good but which is another run's (copied under this name)
    records[3].write_bytes(records[0].read_bytes())
    with pytest.warns(UserWarning, match=r"ncm-s1\.json: not a run record of ncm seed 1"):
        assert rerun() == want
    assert calls == [("ncm", 1)]
    # --summarize_only: a damaged record is moved aside and left out, nothing is trained
    records[0].write_bytes(b"{")
    with pytest.warns(UserWarning, match=r"naive-s0\.json"):
        rows, _ = rerun("--summarize_only", "true")
    assert calls == [] and [r["seeds"] for r in rows] == [1, 2]
    assert rerun() == want and calls == [("naive", 0)]
    assert rerun() == want and calls == []  # and now every record is read back


# ------------------------------------------------------------------ the cosine head


class _LinearFeatures:
    """Stands in for :class:`ci.Net` in ``_fns``: features ``x @ enc``, the ``head`` Dense."""

    def apply(self, variables, x, method=None):
        p = variables["params"]
        f = x @ p["enc"]
        if method is ci.Net.features:
            return f
        return f @ p["head"]["kernel"] + p["head"]["bias"], None


def test_cosine_head_is_scaled_cosine_and_linear_head_is_fc_over_temperature():
    """Against NumPy: the cosine head's logits are ``cosine_scale * cos(f, w_c)`` (bounded by
    the scale, blind to each class weight's norm and to the bias); the linear head is
    ``(f W + b) / logit_temperature``."""
    rng = np.random.default_rng(2)
    params = {
        "enc": rng.normal(size=(8, 5)),
        "head": {"kernel": rng.normal(size=(5, 6)), "bias": rng.normal(size=6)},
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    lin = ci.Config()
    cos = dataclasses.replace(lin, head="cosine", cosine_scale=7.0)
    model = _LinearFeatures()
    f = np.asarray(x, np.float64) @ np.asarray(params["enc"], np.float64)
    w = np.asarray(params["head"]["kernel"], np.float64)
    b = np.asarray(params["head"]["bias"], np.float64)
    want = 7.0 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))
    got = np.asarray(ci._fns(model, cos)[0](params, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got).max() <= 7.0 + 1e-5
    head = {"kernel": params["head"]["kernel"] * jnp.arange(1.0, 7.0), "bias": 0 * b}
    np.testing.assert_allclose(
        np.asarray(ci._fns(model, cos)[0]({**params, "head": head}, x)), got, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(ci._fns(model, lin)[0](params, x)), (f @ w + b) / 3.0, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--head", "softmax"], "--head 'softmax'"),
        (["--cosine_scale", "0"], "--cosine_scale"),
        (["--imprint", "true"], "--imprint true needs --head cosine"),
    ],
)
def test_bad_head_flags_are_rejected_before_anything_runs(tmp_path, flags, match):
    out = tmp_path / "ci"
    with pytest.raises(ValueError, match=match):
        ci.main(["--preset", "tiny", "--out", str(out), *flags])
    assert not out.exists()


def test_a_record_of_another_head_is_refused(tmp_path, monkeypatch, jax_cache_settings):
    """Records do not hold the config: a cosine-head run into a folder of linear-head
    records (older records have no ``head`` and are linear) stops and names the folder
    instead of tabulating the other head's numbers."""
    calls = []
    monkeypatch.setattr(ci, "stage_tasks", lambda cfg, seed: [])
    monkeypatch.setattr(ci, "run_one", _stand_in(calls))
    monkeypatch.setattr(ci, "heatmaps", lambda path, title, mats: None)
    out = tmp_path / "ci"
    ci.main(["--preset", "tiny", "--out", str(out)])
    assert calls == [("naive", 0), ("ncm", 0)]
    with pytest.raises(ValueError, match="naive-s0.json is a run with --head linear, not cosine"):
        ci.main(["--preset", "tiny", "--out", str(out), "--head", "cosine"])
    assert ci.main(["--preset", "tiny", "--out", str(out), "--summarize_only", "true"])
    assert calls == [("naive", 0), ("ncm", 0)]


def test_imprint_sets_new_columns_to_normalised_class_means_and_keeps_the_others():
    """Against NumPy: at task 1's beginning, its head columns become the normalised means of
    the normalised features (here ``x @ enc``) of its training images per class; task 0's
    columns and every other parameter stay as they were."""
    rng = np.random.default_rng(3)
    tasks = []
    for t in range(2):
        y = np.array([0, 1, 2, 0, 1, 2, 2], np.int32)
        x = rng.normal(size=(7, 6)).astype(np.float32)
        tasks.append(Task(f"t{t}", ("a", "b", "c"), x, y, x[:1], y[:1], x, y))
    params = {
        "enc": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
            "bias": jnp.zeros(6),
        },
    }
    method = ci.imprint(lambda p, x: x @ p["enc"], chunk=3)  # chunks of 3: a partial last one
    state = TrainState.create(params, optax.sgd(0.1), methods={method.name: method.init(params)})
    layout = cl.HeadLayout.build("class", tasks)
    ctx = cl.TaskContext(1, tuple(tasks), layout, lambda p, x: x, 0)
    new = method.begin_task(state, ctx).params
    unit = lambda z, a: z / np.linalg.norm(z, axis=a, keepdims=True)  # noqa: E731
    z = unit(tasks[1].x_train.astype(np.float64) @ np.asarray(params["enc"], np.float64), 1)
    want = unit(np.stack([z[tasks[1].y_train == c].mean(0) for c in range(3)], 1), 0)
    got = np.asarray(new["head"]["kernel"])
    np.testing.assert_allclose(got[:, 3:], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:, :3], np.asarray(params["head"]["kernel"])[:, :3])
    np.testing.assert_array_equal(np.asarray(new["enc"]), np.asarray(params["enc"]))


def test_a_record_of_the_other_imprint_setting_is_refused(
    tmp_path, monkeypatch, jax_cache_settings
):
    calls = []
    monkeypatch.setattr(ci, "stage_tasks", lambda cfg, seed: [])
    monkeypatch.setattr(ci, "run_one", _stand_in(calls))
    monkeypatch.setattr(ci, "heatmaps", lambda path, title, mats: None)
    out = tmp_path / "ci"
    ci.main(["--preset", "tiny", "--out", str(out), "--head", "cosine"])
    with pytest.raises(ValueError, match="naive-s0.json is a run with --imprint false, not true"):
        ci.main(["--preset", "tiny", "--out", str(out), "--head", "cosine", "--imprint", "true"])
    assert calls == [("naive", 0), ("ncm", 0)]
