"""The ZSCL experiment: its table on a hand-computed matrix, the shared CLIP training loop on
a toy encoder (iterations, teachers, reference sources, WiSE-FT, damaged checkpoints), bad
settings, and a tiny end-to-end run of the digit preset (MiniCLIP's compiles cost more than
the suite's budget: ``python -m experiments.zscl --preset tiny`` is the end-to-end check of
the default preset)."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import zscl


def test_table_matches_hand_computed_transfer_avg_last():
    # A[j, i]: after task j, on task i (percent).
    a = np.array([[90.0, 40.0, 30.0], [80.0, 95.0, 20.0], [70.0, 85.0, 99.0]])
    # Transfer: mean over i >= 1 of mean_{j < i} A[j, i] = mean(40, mean(30, 20)) = 32.5
    # Avg: mean over i of the column means = mean(80, 73.33.., 49.66..) = 67.66..
    # Last: mean of the last row = 84.66..
    b = a - 10.0
    results = {
        "tasks": ["a", "b", "c"],
        "zero_shot": [50.0, 40.0, 30.0],
        "runs": {
            "m": [
                {"accuracy": a.tolist(), "transfer": 32.5, "avg": 203 / 3, "last": 254 / 3},
                {"accuracy": b.tolist(), "transfer": 22.5, "avg": 173 / 3, "last": 224 / 3},
            ]
        },
    }
    # the per-run numbers are what cljax.continual computes
    from cljax import continual

    for run in results["runs"]["m"]:
        acc = np.asarray(run["accuracy"])
        assert continual.mtil_transfer(acc) == pytest.approx(run["transfer"])
        assert continual.mtil_avg(acc) == pytest.approx(run["avg"])
        assert continual.mtil_last(acc) == pytest.approx(run["last"])
    table, rows = zscl.summarize(results)
    # zero-shot: every row is the zero-shot accuracies -> Transfer = mean(40, 30) = 35
    assert rows[0] == {"method": "zero-shot", "Transfer": "35.0", "Avg": "40.0", "Last": "40.0"}
    # mean ± sample std over the two runs: 27.5 ± 7.1, 62.7 ± 7.1, 79.7 ± 7.1
    assert rows[1] == {
        "method": "m",
        "Transfer": "27.5 ± 7.1",
        "Avg": "62.7 ± 7.1",
        "Last": "79.7 ± 7.1",
    }
    assert "| zero-shot" in table
    assert "85.0" in zscl.matrices(results)  # seed-mean of 90 and 80: after task 0, on task a


def test_every_zscl_preset_shares_the_methods_and_their_terms():
    from experiments import _clip_zscl_checks

    assert set(zscl.METHODS) == set(_clip_zscl_checks.METHODS)
    terms = {m: {k for k, on in zscl.method_flags(m).items() if on} for m in zscl.METHODS}
    assert terms == {  # ZSCL = weight ensembling + feature distillation + an L2 anchor
        "finetune": set(),
        "zscl": {"we", "distill", "l2"},
        "lwf": {"lwf"},
        "wise_ft": {"wise"},
        "we": {"we"},
        "distill": {"distill"},
    }


def test_unknown_method_and_preset():
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        zscl.method_flags("sgd")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        zscl.main(["--preset", "huge"])
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        zscl.main(["--methods", "sgd"])


@pytest.mark.parametrize(
    ("flag", "value"),
    [("lr", "nan"), ("temperature", "inf"), ("l2_weight", "-inf"), ("wise_alpha", "nan")],
)
def test_nonfinite_settings_rejected_before_any_work(tmp_path, flag, value):
    for preset in ("default", "digits", "mtil"):
        argv = ["--preset", preset, "--out", str(tmp_path), f"--{flag}={value}"]
        with pytest.raises(ValueError, match=rf"{preset}: {flag}=.* must be finite"):
            zscl.main(argv)
    assert not list(tmp_path.iterdir())  # nothing was drawn, built or written


# ------------------------------------------------- the shared loop on a toy "CLIP"


class _Encoder:
    """A linear image encoder ``x @ w``: features of width 4 from inputs of width 3."""

    def apply(self, variables, x):
        return x @ variables["params"]["w"]


class _Data:
    """``batch_at`` that logs (source, step, seed) and returns reproducible batches."""

    def __init__(self, name, classes, log):
        self.name, self.classes, self.log = name, classes, log

    def batch_at(self, step, batch_size, *, seed=0):
        self.log.append((self.name, step, seed))
        r = np.random.default_rng([seed, step, len(self.name)])
        x = r.normal(size=(batch_size, 3)).astype(np.float32)
        return {"x": x, "y": r.integers(0, self.classes, batch_size).astype(np.int32)}


def _toy_env(log, features, evaluate):
    """The ``env`` of :func:`experiments.clip_zscl.run_method` for a linear toy "CLIP"."""
    classes = {"a": 3, "b": 3}  # one shape of LwF texts: one compiled step

    def head(c):
        return {
            "kernel": jnp.pad(5.0 * jnp.eye(4)[:, :c], ((0, 0), (0, 3 - c))),
            "bias": jnp.pad(jnp.zeros(c), (0, 3 - c), constant_values=-1e9),
        }

    return {
        "encoder": _Encoder(),
        "theta0": {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)},
        "train_tasks": {n: _Data("train:" + n, c, log) for n, c in classes.items()},
        "tasks": {n: _Data("plain:" + n, c, log) for n, c in classes.items()},
        "reference": _Data("reference", 1, log),
        "heads": {n: head(c) for n, c in classes.items()},
        "anchors": jnp.eye(4)[:3],
        "lwf_texts": {n: jnp.eye(4)[:c] for n, c in classes.items()},
        "scale": 10.0,
        "features": features,
        "evaluate": evaluate,
    }


def _toy_cfg(method, steps, **overrides):
    cfg = dict(
        preset="toy",
        methods=(method,),
        tasks=("a", "b"),
        steps_per_task=steps,
        batch_size=4,
        ref_batch_size=5,
        lr=1e-2,
        fast_lr=1e-2,
        fast_lr_tasks=(),
        warmup=1,
        label_smoothing=0.2,
        avg_freq=steps,
        temperature=2.0,
        distill_weight=1.0,
        l2_weight=1.0,
        wise_alpha=0.8,
    )
    return types.SimpleNamespace(**{**cfg, **overrides})


def _toy_run(tmp_path, method, steps=3, **overrides):
    from experiments import clip_zscl

    log, evaluated, teachers = [], [], []
    features = jax.jit(lambda p, x: _Encoder().apply({"params": p}, x))

    def spy_features(p, x):
        teachers.append(jax.tree.map(np.asarray, p))
        return features(p, x)

    def evaluate(p):
        evaluated.append(jax.tree.map(np.asarray, p))
        return np.zeros(2)

    env = _toy_env(log, spy_features, evaluate)
    cfg = _toy_cfg(method, steps, **overrides)
    clip_zscl.check_recipe(cfg)
    ((acc, start),) = clip_zscl.run_method(
        method, cfg, env, tmp_path / method, {"toy": 1}, seeds=(7,)
    )
    return {"log": log, "evaluated": evaluated, "teachers": teachers, "theta0": env["theta0"]}


def _tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.slow
def test_lwf_teacher_is_the_start_of_task_model_on_the_tasks_own_images(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    r = _toy_run(tmp_path, "lwf", steps=3)
    train = [e for e in r["log"] if e[0].startswith("train")]
    # steps_per_task + 1 iterations a task, steps 0..3, as the reference's range(1000 + 1)
    assert [(n, s) for n, s, _ in train] == [("train:a", s) for s in range(4)] + [
        ("train:b", s) for s in range(4)
    ]
    refs = [e[0] for e in r["log"] if not e[0].startswith("train")]
    assert refs == ["plain:a"] * 4 + ["plain:b"] * 4  # lwf.sh: --ref-dataset = current task
    # lwf.sh: --ref-model = the previous task's saved model (the pretrained one for task 0)
    assert all(_tree_equal(t, r["theta0"]) for t in r["teachers"][:4])
    assert all(_tree_equal(t, r["evaluated"][0]) for t in r["teachers"][4:])
    assert not _tree_equal(r["evaluated"][0], r["theta0"])  # it did train


def test_distill_teacher_is_pretrained_on_reference_images(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    r = _toy_run(tmp_path, "distill", steps=2)
    refs = [(n, s) for n, s, _ in r["log"] if not n.startswith("train")]
    # one reference stream across the tasks, never the task's own images
    assert refs == [("reference", s) for s in range(6)]
    assert len(r["teachers"]) == 6
    assert all(_tree_equal(t, r["theta0"]) for t in r["teachers"])


def test_wise_ft_alpha_zero_keeps_the_start_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    r = _toy_run(tmp_path, "wise_ft", steps=2, wise_alpha=0.0)
    assert len(r["evaluated"]) == 2
    assert all(_tree_equal(p, r["theta0"]) for p in r["evaluated"])
    assert r["teachers"] == []


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_digits_tiny_preset_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    argv = ["--preset", "digits-tiny", "--out", str(tmp_path), "--methods", "finetune", "zscl"]
    res = zscl.main(argv)
    assert res["tasks"] == ["rotated", "digits", "parity"]
    for method in ("finetune", "zscl"):
        (run,) = res["runs"][method]
        acc = np.asarray(run["accuracy"])
        assert acc.shape == (3, 3) and np.isfinite(acc).all()
        assert 0 <= acc.min() and acc.max() <= 100
    assert len(res["zero_shot"]) == 3
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"]["zscl"][0]["accuracy"] == res["runs"]["zscl"][0]["accuracy"]
    assert (tmp_path / "metrics.png").exists() and (tmp_path / "matrices.png").exists()
    # a re-run resumes from the finished checkpoints and reproduces the numbers
    again = zscl.main(argv[:-2] + ["zscl"])
    assert again["resumed_from"] == {"zscl": 3}
    assert again["runs"]["zscl"] == res["runs"]["zscl"]


@pytest.mark.slow
def test_nonfinite_training_stops_naming_method_and_task(tmp_path, monkeypatch):
    """A learning rate that overflows the weights: an error, no checkpoint of the task."""
    from cljax.train import NonFiniteError

    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    argv = ["--preset", "digits-tiny", "--out", str(tmp_path), "--methods", "finetune"]
    argv += ["--lr", "1e38"]
    with pytest.raises(NonFiniteError, match=r"finetune: non-finite .* task 0 \('rotated'\)"):
        zscl.main(argv)
    assert not list((tmp_path / "ckpt" / "finetune").glob("step_*"))


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_damaged_checkpoints_resume_to_identical_results(tmp_path, monkeypatch):
    """The checkpoints of the CLIP presets' loop (``clip_zscl.run_method``, which the default
    MiniCLIP preset runs), damaged at each stage -- a run stopped during its second task, a
    finished run -- by each kind of damage of tests/test_checkpoint.py and by a crash during
    the write: the re-run names the damaged checkpoint, keeps it aside, goes back to the last
    good state (or starts over) and ends with the same accuracy matrix, and a further re-run
    only loads. The loop, its data order, WiSE-FT's interpolation with the start-of-task
    weights and the checkpoints are the experiment's; a linear toy encoder stands in for
    MiniCLIP and a NumPy gradient step for the compiled one (which each call of run_method
    compiles anew, seconds a re-run: more than the suite's budget)."""
    import contextlib
    import shutil

    from experiments import clip_zscl
    from tests.test_checkpoint import DAMAGE

    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")

    def make_step(loss_fn, **kw):  # least squares to the one-hot labels, plain SGD
        def step(state, batch):
            w, x = np.asarray(state.params["w"]), batch["x"]
            err = x @ w - np.eye(4, dtype=np.float32)[batch["y"]]
            w = w - np.float32(0.1) * x.T @ err / len(x)
            return state.replace(params={"w": jnp.asarray(w)}), {}

        return step

    monkeypatch.setattr(clip_zscl, "make_step", make_step)

    def evaluate(p):  # a fingerprint of the weights: equal only if they are bit-identical
        w = np.asarray(p["w"], np.float64)
        return np.array([w.sum(), (w * w).sum()])

    env = _toy_env([], jax.jit(lambda p, x: _Encoder().apply({"params": p}, x)), evaluate)
    stop = []

    class _Stopping(_Data):  # task b's data: raises while `stop` is set, as a killed run
        def batch_at(self, step, batch_size, *, seed=0):
            if stop:
                raise _Stop
            return super().batch_at(step, batch_size, seed=seed)

    env["train_tasks"]["b"] = _Stopping("train:b", 3, [])
    cfg = _toy_cfg("wise_ft", steps=2)

    def run(d):
        ((acc, start),) = clip_zscl.run_method("wise_ft", cfg, env, d, {"toy": 1}, seeds=(7,))
        return acc, start

    want, start = run(tmp_path / "finished")
    assert start == 0 and want.shape == (2, 2)
    stop.append(True)
    with pytest.raises(_Stop):
        run(tmp_path / "stopped")
    stop.clear()
    assert [p.name for p in (tmp_path / "stopped" / "seed7").iterdir()] == ["step_1"]
    # stage 1 (stopped after task 0) and stage 2 (finished): the damaged step_n
    # each file of a checkpoint: the array data, orbax's metadata (damage the manifest
    # cannot see), the manifest; and the temporary folder of a write cut short
    kinds = ["flip array byte", "unseen: truncate metadata", "delete manifest"]
    kinds += ["crash during the write"]
    for stage, n in (("stopped", 1), ("finished", 2)):
        for kind in kinds:
            d = tmp_path / f"{stage}-{kind}"
            shutil.copytree(tmp_path / stage / "seed7", d / "seed7")
            step = d / "seed7" / f"step_{n}"
            warns = pytest.warns(UserWarning, match=rf"step_{n}.*moved .* aside")
            if kind == "crash during the write":  # killed before the rename: no step_n
                if stage == "finished":  # then the step before it is still there
                    shutil.copytree(
                        tmp_path / "stopped" / "seed7" / "step_1", d / "seed7" / "step_1"
                    )
                step.rename(step.with_name(f".tmp-{n}-0"))
                warns = contextlib.nullcontext()
            else:
                DAMAGE[kind](step)
            with warns:
                acc, start = run(d)
            # keep=1: a damaged step_n was the only checkpoint; a crash during the write
            # leaves the one before it
            back = n - 1 if kind == "crash during the write" else 0
            assert start == back and np.array_equal(acc, want), (stage, kind)
            if kind != "crash during the write":
                assert (d / "seed7" / f".corrupt-{n}").is_dir()  # kept, not deleted
        assert run(d)[1] == 2, stage  # and now it only loads
    # the undamaged stopped run resumes after task 0 to the same matrix
    acc, start = run(tmp_path / "stopped")
    assert start == 1 and np.array_equal(acc, want)
