"""The CLIP MTIL preset of the ZSCL experiment on a tiny random CLIP and mock TFDS data."""

import json

import jax
import numpy as np
import pytest

from cljax import continual
from cljax.checkpoint import CheckpointManager


def _tiny_encoder_params(directory):
    """The image-encoder params of the preset's tiny random CLIP (same seed, rebuilt)."""
    from cljax.models import clip
    from experiments import clip_zscl

    path, config = clip_zscl._tiny_clip(directory, seed=0)
    return clip.load_hf_safetensors(path, clip.CLIPImageEncoder(config))


@pytest.mark.long  # make test-long; CI runs the cheaper tests that cover its path
@pytest.mark.slow
def test_mtil_tiny_preset_runs_and_resumes(tmp_path):
    from experiments import zscl

    argv = ["--preset", "mtil-tiny", "--methods", "zscl", "--out", str(tmp_path)]
    res = zscl.main(argv)
    tasks = res["tasks"]
    assert tasks == ["cifar100", "eurosat", "mnist"]
    assert len(res["zero_shot"]) == 3 and all(0 <= a <= 100 for a in res["zero_shot"])
    run = res["runs"]["zscl"]
    acc = np.asarray(run["accuracy"])
    assert acc.shape == (3, 3) and np.all((acc >= 0) & (acc <= 100))
    # the metrics are those of the matrix (the MTIL definitions of cljax.continual)
    np.testing.assert_allclose(run["transfer"], continual.mtil_transfer(acc))
    np.testing.assert_allclose(run["last"], acc[-1].mean())
    assert run["resumed_from"] == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["zscl"]["accuracy"] == run["accuracy"]
    assert (tmp_path / "matrices.png").is_file() and (tmp_path / "table.md").is_file()
    assert list((tmp_path / "heads").glob("head-*.npz")), "zero-shot heads are cached on disk"
    assert res["reference_texts"]["source"] == "class prompts of the sequence"
    assert res["reference_texts"]["count"] == 100 + 10 + 10  # a prompt per class

    # The checkpointed encoder after the last task moved away from the pretrained one.
    theta0 = _tiny_encoder_params(tmp_path / "reference-clip")
    step, saved_tree, meta = CheckpointManager(tmp_path / "ckpt" / "zscl" / "seed0").restore_latest(
        {"params": theta0, "acc": np.zeros((3, 3))}
    )
    assert step == 3 and meta["config"]["tasks"] == tasks
    moved = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(np.abs(np.asarray(a) - b).max()), saved_tree["params"], theta0
        )
    )
    assert max(moved) > 0 and all(np.isfinite(moved))

    # A re-run with the same --out restores every task from the checkpoints.
    again = zscl.main(argv)
    assert again["runs"]["zscl"]["resumed_from"] == 3
    assert again["runs"]["zscl"]["accuracy"] == run["accuracy"]


def test_mtil_preset_bad_inputs(tmp_path):
    from experiments import zscl

    out = ["--out", str(tmp_path)]
    with pytest.raises(ValueError, match="--clip_path is required"):
        zscl.main(["--preset", "mtil", *out])
    with pytest.raises(ValueError, match="unknown method 'ewc'"):
        zscl.main(["--preset", "mtil", "--methods", "ewc", *out])
    with pytest.raises(ValueError, match="unknown dataset 'imagenet_sketch'"):
        zscl.main(["--preset", "mtil", "--tasks", "dtd", "imagenet_sketch", *out])
    with pytest.raises(ValueError, match="at least two distinct datasets"):
        zscl.main(["--preset", "mtil", "--tasks", "dtd", "dtd", *out])
    with pytest.raises(ValueError, match="wise_alpha=1.5 must be in"):
        zscl.main(["--preset", "mtil", "--wise_alpha", "1.5", *out])


def test_mtil_preset_keeps_zscl_recipe():
    # ZSCL's own recipe (its args.py --warmup_length 100 and the RandomResizedCrop(scale=(0.9,
    # 1.0)) training transform of its clip.py), not task_vectors' 500 warm-up steps.
    from experiments import clip_zscl

    cfg = clip_zscl.PRESETS["mtil"]
    assert cfg.warmup == 100 and cfg.augment
