"""The CLIP preset of the merging experiment on a tiny random CLIP and mock TFDS data."""

import json

import pytest


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
