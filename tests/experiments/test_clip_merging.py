"""The CLIP preset of the merging experiment on a tiny random CLIP and mock TFDS data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_clip_tiny_preset_runs_end_to_end(tmp_path):
    from experiments import merging

    res = merging.main(["--preset", "clip-tiny", "--out", str(tmp_path)])
    methods = [r["method"] for r in res["rows"]]
    assert methods[0] == "zero-shot" and methods[-1] == "fine-tuned (each its own)"
    assert any(m.startswith("task arithmetic (λ=") for m in methods)
    assert any(m.startswith("TIES dis-mean") for m in methods) and any(
        m.startswith("TIES dis-sum") for m in methods
    )
    assert "aTLAS" in methods
    for row in res["rows"]:
        assert 0.0 <= row["mean"] <= 100.0 and set(row) >= {"mnist", "svhn", "normalised"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == res["rows"]
    assert list((tmp_path / "heads").glob("head-*.npz")), "zero-shot heads are cached on disk"


def test_clip_preset_needs_a_checkpoint(tmp_path):
    from experiments import merging

    with pytest.raises(ValueError, match="--clip_path is required"):
        merging.main(["--preset", "clip-vit-b32", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="not one of"):
        merging.main(["--preset", "clip-vit-h99", "--out", str(tmp_path)])


def test_clip_preset_ties_qkv_as_the_reference(tmp_path):
    # open_clip packs q, k, v into one in_proj_weight and one in_proj_bias per layer: two
    # blocks a layer in the reference, where the Hugging Face layout holds six leaves.
    from cljax.models import clip
    from experiments import clip_merging

    cfg = clip_merging.PRESETS["clip-tiny"]
    path, _, config = clip_merging._tiny_checkpoints(cfg, tmp_path)
    theta0 = clip.load_hf_safetensors(path, clip.CLIPImageEncoder(config))
    spec = clip_merging.atlas_blocks(theta0)
    for i in range(config.vision.num_layers):
        attn = f"vision_model/encoder/layers_{i}/self_attn"
        for kind in ("kernel", "bias"):
            want = sorted(f"{attn}/{n}_proj/{kind}" for n in "qkv")
            assert sorted(spec.members(f"{attn}/qkv_{kind}")) == want


def _reference_cosine_lr(base_lr, warmup_length, steps, step):
    """task_vectors' (and ZSCL's) ``src/utils.py`` ``cosine_lr``, literally."""
    if step < warmup_length:
        return base_lr * (step + 1) / warmup_length
    e = step - warmup_length
    es = steps - warmup_length
    return 0.5 * (1 + np.cos(np.pi * e / es)) * base_lr


@pytest.mark.parametrize("warmup,steps", [(500, 2000), (100, 1000), (3, 10), (0, 5)])
def test_cosine_lr_is_the_references(warmup, steps):
    from experiments import clip_merging

    sched = jax.jit(clip_merging.cosine_lr(1e-5, warmup, steps))
    for s in sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1, steps // 2, steps - 1}):
        want = _reference_cosine_lr(1e-5, warmup, steps, s)
        np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-12, err_msg=f"{s=}")


def test_cosine_lr_bad_input():
    from experiments import clip_merging

    with pytest.raises(ValueError, match="warmup=-1 must be an int >= 0"):
        clip_merging.cosine_lr(1e-5, -1, 10)
    with pytest.raises(ValueError, match="steps=0 must be an int >= 1"):
        clip_merging.cosine_lr(1e-5, 5, 0)


def test_presets_warm_up_500_steps_and_augment():
    from experiments import clip_merging

    cfg = clip_merging.PRESETS["clip-vit-b32"]
    assert cfg.finetune_warmup == 500 and cfg.augment


def test_crop_boxes_follow_torchvision_rules():
    from experiments import clip_merging

    rng = np.random.default_rng(0)
    boxes = clip_merging.random_resized_crop_boxes(rng, 2000, 240, 320)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 240).all() and (left + w <= 320).all()
    frac = h * w / (240 * 320)
    assert frac.min() > 0.89 and frac.max() < 1.01  # scale (0.9, 1.0), up to rounding
    aspect = w / h
    assert aspect.min() > 0.74 and aspect.max() < 1.35  # ratio (3/4, 4/3)
    assert len(set(map(tuple, boxes))) > 1000  # positions and sizes vary
    # Reproducible from the generator's state.
    again = clip_merging.random_resized_crop_boxes(np.random.default_rng(0), 2000, 240, 320)
    np.testing.assert_array_equal(boxes, again)


def test_crop_boxes_fallback_is_the_centred_clamped_box():
    # 10 x 1000: no box of 90 % of the area with aspect <= 4/3 fits, so all 10 tries fail;
    # torchvision then takes h = 10, w = round(10 * 4/3) = 13, centred: left = 493.
    from experiments import clip_merging

    boxes = clip_merging.random_resized_crop_boxes(np.random.default_rng(1), 3, 10, 1000)
    np.testing.assert_array_equal(boxes, [[0, 493, 10, 13]] * 3)
    tall = clip_merging.random_resized_crop_boxes(np.random.default_rng(1), 1, 1000, 10)
    np.testing.assert_array_equal(tall, [[(1000 - 13) // 2, 0, 13, 10]])  # round(10 / 0.75)


def test_crop_boxes_bad_input():
    from experiments import clip_merging

    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"scale=\(0.0, 1.0\) must satisfy"):
        clip_merging.random_resized_crop_boxes(rng, 1, 8, 8, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"ratio=\(2.0, 1.0\) must satisfy"):
        clip_merging.random_resized_crop_boxes(rng, 1, 8, 8, ratio=(2.0, 1.0))


def test_resized_crops_equal_crop_then_resize():
    # Independent path: numpy slicing of the box, then jax.image.resize of the crop. Equal
    # away from the crop's border (where the one-pass resampling may read pixels just
    # outside the box, which a crop cannot), and exactly for a box of the output's size.
    from experiments import clip_merging

    rng = np.random.default_rng(2)
    images = rng.uniform(size=(3, 48, 40, 3)).astype(np.float32)
    boxes = np.array([[0, 0, 48, 40], [3, 5, 32, 32], [4, 2, 44, 36]])
    got = np.asarray(clip_merging.resized_crops(jnp.asarray(images), jnp.asarray(boxes), size=32))
    for k, (t, l, h, w) in enumerate(boxes):
        crop = images[k, t : t + h, l : l + w]
        want = np.asarray(jax.image.resize(crop, (32, 32, 3), "bicubic", antialias=True))
        if (h, w) == (32, 32):
            np.testing.assert_allclose(got[k], crop, atol=1e-6)
        elif (t, l, h, w) == (0, 0, 48, 40):
            np.testing.assert_allclose(got[k], want, atol=1e-5)
        else:
            np.testing.assert_allclose(got[k, 4:-4, 4:-4], want[4:-4, 4:-4], atol=1e-5)


def test_augmented_task_batches(tmp_path):
    import tensorflow_datasets as tfds

    from cljax.data import TFDSTask
    from experiments import clip_merging

    with tfds.testing.mock_data(num_examples=32):
        plain = TFDSTask("mnist", image_size=16, seed=0)
        aug = clip_merging.AugmentedTask("mnist", data_dir=None, image_size=16)
        a = aug.batch_at(3, 4, seed=1)
        np.testing.assert_array_equal(a["x"], aug.batch_at(3, 4, seed=1)["x"])  # random access
        ref = plain.batch_at(3, 4, seed=1)
        np.testing.assert_array_equal(a["y"], ref["y"])  # the same examples
        assert a["x"].shape == ref["x"].shape == (4, 16, 16, 3) and a["x"].dtype == np.float32
        assert not np.allclose(a["x"], ref["x"])  # but cropped
        assert not np.allclose(aug.batch_at(4, 4, seed=1)["x"], aug.batch_at(3, 4, seed=1)["x"])
        with pytest.raises(RuntimeError, match="through batch_at only"):
            next(aug.task.eval_batches(4))
