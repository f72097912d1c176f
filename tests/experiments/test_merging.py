"""Smoke test of the main job (``experiments/merging.py``) on its tiny preset."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.checkpoint import tree_fingerprint
from cljax.train import TrainState, make_step
from experiments import merging as exp


def _check_results(results, tasks, printed):
    assert set(results) >= {"config", "tasks", "methods", "stages", "time", "control"}
    assert results["tasks"] == list(tasks)
    methods = results["methods"]
    want = {"pretrained", "fine-tuned", "task arithmetic", "TIES (mean)", "TIES (sum)"}
    assert set(methods) == want | {"DARE + TA", "average"}
    for name, r in methods.items():
        assert set(r["test"]) == set(results["tasks"]), name
        assert all(0.0 <= v <= 100.0 for v in r["test"].values())
        np.testing.assert_allclose(r["mean"], np.mean(list(r["test"].values())))
        ratios = [100 * r["test"][t] / methods["fine-tuned"]["test"][t] for t in results["tasks"]]
        np.testing.assert_allclose(r["normalized_mean"], np.mean(ratios))
        assert "tau" not in r
    assert methods["fine-tuned"]["normalized_mean"] == pytest.approx(100.0)
    assert methods["TIES (mean)"]["scale"] in exp.TIES_MEAN_GRID
    assert methods["task arithmetic"]["scale"] in exp.merging.DEFAULT_GRID
    assert len(methods["TIES (sum)"]["val_scores"]) == len(exp.merging.DEFAULT_GRID)
    assert results["stages"]["restored"] == []
    assert "| method" in printed and "| TIES (mean)" in printed and "Normalised" in printed


@pytest.mark.slow
def test_main_tiny_then_resume(tmp_path, capsys, monkeypatch):
    """The embedded preset: MiniCLIP, zero-shot heads, the control task, resume."""
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "run"
    first = exp.main(["--preset", "tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    _check_results(results, ("mnist", "letters", "textures"), printed)
    control = results["control"]
    assert set(control) >= set(results["methods"]) | {"fine-tuned (per task)"}
    assert set(control["fine-tuned (per task)"]) == set(results["tasks"])
    assert all(0.0 <= v <= 100.0 for k, v in control.items() if k != "fine-tuned (per task)")
    assert "| control" in printed
    assert (out / "accuracy.png").stat().st_size > 1000

    # A second run restores every fine-tune and reproduces the numbers.
    second = exp.main(["--preset", "tiny", "--out", str(out)])
    assert second["stages"]["trained"] == []
    assert set(second["stages"]["restored"]) == {f"finetune-{t}" for t in results["tasks"]}
    for name in results["methods"]:
        assert second["methods"][name]["test"] == first["methods"][name]["test"], name
    assert second["control"] == first["control"]


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_digits_tiny_then_resume(tmp_path, capsys, monkeypatch):
    """The former digit benchmark stays available as a preset."""
    monkeypatch.setenv("CLJAX_NO_PROGRESS", "1")
    out = tmp_path / "run"
    first = exp.main(["--preset", "digits-tiny", "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    _check_results(results, ("mnist", "rotated", "parity"), printed)
    assert results["control"] is None
    second = exp.main(["--preset", "digits-tiny", "--out", str(out)])
    assert second["stages"]["trained"] == []
    assert set(second["stages"]["restored"]) == {
        "pretrain",
        "heads",
        "finetune-mnist",
        "finetune-rotated",
        "finetune-parity",
    }
    for name in results["methods"]:
        assert second["methods"][name]["test"] == first["methods"][name]["test"], name


@pytest.mark.slow
def test_zero_shot_encoder_matches_clip_and_normalises():
    from cljax.models import clip

    pre = clip.load_pretrained()
    enc = exp.ZeroShotEncoder(pre.model.config, mean=pre.mean, std=pre.std)
    params = clip.image_encoder_params(pre.params)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    f = np.asarray(enc.apply({"params": params}, x))
    ref = pre.model.apply(
        {"params": pre.params},
        clip.normalize_images(x, pre.mean, pre.std),
        method=clip.CLIP.encode_image,
    )
    ref = np.asarray(ref) / np.linalg.norm(np.asarray(ref), axis=-1, keepdims=True)
    np.testing.assert_allclose(f, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_train_resumes_after_a_crash_bitwise(tmp_path):
    """A run killed mid-stage continues from its last checkpoint to the same final state."""
    w = jnp.array([[0.5, -1.0], [2.0, 0.0]])
    data = np.random.default_rng(0).normal(size=(16, 4, 2)).astype(np.float32)

    def loss_fn(p, batch, rng):
        return jnp.mean((batch["x"] @ p["w"] - batch["x"] @ w) ** 2)

    step = make_step(loss_fn)
    tx = optax.adamw(1e-2)
    fresh = lambda: TrainState.create({"w": jnp.zeros((2, 2))}, tx, key=0)
    batch_at = lambda s: {"x": data[s]}

    straight, trained = exp._train(
        tmp_path / "a", fresh(), step, batch_at, 10, save_every=3, desc="a"
    )
    assert trained

    def crashing(s):
        if s == 7:
            raise KeyboardInterrupt
        return batch_at(s)

    with pytest.raises(KeyboardInterrupt):
        exp._train(tmp_path / "b", fresh(), step, crashing, 10, save_every=3, desc="b")
    resumed, trained = exp._train(
        tmp_path / "b", fresh(), step, batch_at, 10, save_every=3, desc="b"
    )
    assert trained and int(resumed.step) == 10
    assert tree_fingerprint(resumed.params) == tree_fingerprint(straight.params)
    # Finished: a third call restores and does not train.
    again, trained = exp._train(tmp_path / "b", fresh(), step, batch_at, 10, save_every=3, desc="b")
    assert not trained
    chex.assert_trees_all_equal(again.params, resumed.params)


def test_fit_head_and_padding():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 5)).astype(np.float32)
    labels = (feats[:, 0] + 0.5 * feats[:, 1] > 0).astype(np.int32)
    head = exp._fit_head(feats, labels, 2, l2=1e-3)
    chex.assert_shape(head["kernel"], (5, 2))
    acc = np.mean(np.argmax(feats @ head["kernel"] + head["bias"], -1) == labels)
    assert acc > 0.95
    padded = exp._pad_head(head, 4)
    logits = jnp.asarray(feats) @ padded["kernel"] + padded["bias"]
    probs = jax.nn.softmax(logits)
    np.testing.assert_array_equal(np.asarray(probs[:, 2:]), 0.0)
    chex.assert_trees_all_close(logits[:, :2], feats @ head["kernel"] + head["bias"], rtol=1e-6)
    with pytest.raises(ValueError, match="expected 3"):
        exp._fit_head(feats, labels, 3, l2=1e-3)


def test_presets_and_flags():
    assert set(exp.PRESETS) >= {"default", "tiny", "digits", "digits-tiny"}
    assert exp.PRESETS["default"].benchmark == "embedded"
    with pytest.raises(ValueError, match="benchmark"):
        exp.build_pool(exp.dataclasses.replace(exp.PRESETS["tiny"], benchmark="cars"), "/tmp/x")
    with pytest.raises(SystemExit):
        exp.main(["--preset", "nope"])
